"""``crossinfer backends``: the discovered backends as an aligned text table or as JSON."""

from __future__ import annotations

import json
from typing import Any

from crossinfer.registry import BackendInfo

COLUMNS: tuple[str, ...] = (
    "name", "package", "version", "api", "available", "collectives", "quantizations", "reason",
    "devices",
)  # fmt: skip
"""Column order of the table and key order of each JSON object."""


def info_to_dict(info: BackendInfo) -> dict[str, Any]:
    """The JSON-ready fields of one row; the backend instance itself is left out."""
    return {
        "name": info.name,
        "package": info.package,
        "version": info.version,
        "api": info.api,
        "available": info.available,
        "collectives": _collectives(info),
        "quantizations": list(_capability(info, "quantizations", ())),
        "reason": info.reason,
        "devices": list(info.devices),
    }


def format_json(infos: list[BackendInfo]) -> str:
    """A JSON list with one object per backend, keys in :data:`COLUMNS` order."""
    return json.dumps([info_to_dict(info) for info in infos], indent=2)


def format_table(infos: list[BackendInfo]) -> str:
    """A plain table, columns padded to their widest cell; "-" marks an empty cell."""
    rows = [list(COLUMNS)] + [_cells(info) for info in infos]
    # The last column is not padded, so lines carry no trailing spaces.
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def _cells(info: BackendInfo) -> list[str]:
    values = info_to_dict(info)
    values["available"] = "yes" if info.available else "no"
    values["devices"] = ", ".join(info.devices)
    values["quantizations"] = ",".join(values["quantizations"])
    return [str(values[column]) or "-" for column in COLUMNS]


def _collectives(info: BackendInfo) -> str:
    """The torch.distributed backend its ranks talk over (what ``--tensor-parallel-size``
    uses), "" when it has none or could not be asked."""
    return _capability(info, "distributed_backend", None) or ""


def _capability(info: BackendInfo, name: str, missing: Any) -> Any:
    """One field of the backend's capabilities; ``missing`` when it could not be asked."""
    if info.backend is None:
        return missing
    try:
        return getattr(info.backend.capabilities(), name, missing)
    except Exception:  # a row is still shown for a backend whose capabilities fail
        return missing
