"""Counting GPUs without creating a device context (probe() must stay cheap)."""

from __future__ import annotations

import torch


def visible_device_count() -> int:
    """Devices torch can use; torch.cuda.device_count() asks NVML or the runtime without
    initialising torch's CUDA state. Any failure means none."""
    try:
        return int(torch.cuda.device_count())
    except Exception:
        return 0
