"""Counting GPUs without creating a device context (probe() must stay cheap)."""

from __future__ import annotations

from types import ModuleType


def visible_device_count(device_module: ModuleType) -> int:
    """Devices torch can use through ``device_module`` (``torch.cuda``, ``torch.xpu``):
    ``device_count()`` asks the driver or runtime without initialising torch's device state.
    Any failure means none."""
    try:
        return int(device_module.device_count())
    except Exception:
        return 0
