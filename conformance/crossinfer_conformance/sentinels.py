"""Sentinels around KV writes: fill every slot of a cache with known values first, and after
the operation under test, name every slot it was not asked to touch that changed.

The cache layout is the backend's, so the fill goes through ``write_kv`` over every slot and
the check reads every slot back through ``read_kv``. Failures name blocks and slots and how
they relate to the written ones ("block 3, right after written block 2"), which is what a
kernel writing past its block looks like.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from crossinfer.backend import Backend
from crossinfer_conformance.kv_write import write
from crossinfer_conformance.outcome import CheckFailed

KEY_SENTINEL = 6.0
VALUE_SENTINEL = -3.0
"""Exact in every float dtype down to fp8, and never drawn by randn in practice."""


def fill(
    backend: Backend, cache: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Write the sentinels into every slot of a one-layer cache; returns the cache to use.

    shape: (num_slots, num_kv_heads, head_size) of the whole cache; dtype: what write_kv
    is given (the activation dtype).
    """
    device = backend.device()
    keys = torch.full(shape, KEY_SENTINEL, dtype=dtype, device=device)
    values = torch.full(shape, VALUE_SENTINEL, dtype=dtype, device=device)
    slots = torch.arange(shape[0], dtype=torch.int64, device=device)
    return write(backend, keys, values, cache, slots)


def changed_slots(keys: torch.Tensor, values: torch.Tensor, skip: Iterable[int]) -> list[int]:
    """Slots (indices into the read-back ``keys``/``values``) that no longer hold sentinels,
    leaving out ``skip``."""
    k_ok = (keys.float() == KEY_SENTINEL).flatten(1).all(dim=1)
    v_ok = (values.float() == VALUE_SENTINEL).flatten(1).all(dim=1)
    bad = set((~(k_ok & v_ok)).nonzero().flatten().tolist())
    return sorted(bad.difference(skip))


def assert_untouched(
    keys: torch.Tensor, values: torch.Tensor, written: list[int], block_size: int, what: str
) -> None:
    """Raise CheckFailed naming every changed slot outside ``written``, block by block."""
    changed = changed_slots(keys, values, written)
    if changed:
        where = describe_slots(changed, written, block_size)
        raise CheckFailed(f"{what} changed {len(changed)} slots it was not given: {where}")


def describe_slots(slots: list[int], written: list[int], block_size: int) -> str:
    """Group slots by block: 'block 3 slots 0-15 (all of it; right after written block 2)'."""
    written_blocks = sorted({s // block_size for s in written})
    by_block: dict[int, list[int]] = {}
    for slot in slots:
        by_block.setdefault(slot // block_size, []).append(slot % block_size)
    parts = []
    for block, offsets in sorted(by_block.items()):
        text = f"block {block} slot{'s' if len(offsets) > 1 else ''} {_ranges(offsets)}"
        if len(offsets) == block_size:
            text += " (all of it)"
        relation = _relation(block, written_blocks)
        parts.append(f"{text}{relation}")
    return "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more blocks" if len(parts) > 6 else "")


def _relation(block: int, written_blocks: list[int]) -> str:
    if block in written_blocks:
        return ", in a block that was partly written"
    if block - 1 in written_blocks:
        return f", right after written block {block - 1}"
    if block + 1 in written_blocks:
        return f", right before written block {block + 1}"
    return ", not next to any written block"


def _ranges(offsets: list[int]) -> str:
    runs: list[list[int]] = []
    for offset in sorted(offsets):
        if runs and offset == runs[-1][1] + 1:
            runs[-1][1] = offset
        else:
            runs.append([offset, offset])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)
