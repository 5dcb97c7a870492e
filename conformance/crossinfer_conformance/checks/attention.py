"""L1 / L2 paged attention against the CPU reference.

The context is written in two ``write_kv`` calls, as the engine does: the cached part (earlier
steps), then this step's new tokens, and ``attention`` runs over the step. The reference
attends over what the backend's cache holds, read back through ``read_kv`` (over the intended
keys and values when the backend has no ``read_kv``): a KV write fault is then reported by the
write_kv cases alone, and a cache that stores keys in a narrower dtype is judged on its
attention, not on its rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from crossinfer.backend import AttentionBatch, KVCacheSpec
from crossinfer.engine.batch import build_attention_batch
from crossinfer_conformance.cases import KV_HEADS, Case, Seqs
from crossinfer_conformance.checks.paged import (
    Layout,
    random_layout,
    read_back,
    reference_attention,
)
from crossinfer_conformance.compare import assert_close
from crossinfer_conformance.kv_write import write
from crossinfer_conformance.outcome import CheckFailed, NotSupported

if TYPE_CHECKING:
    from crossinfer_conformance.context import CheckContext


def check_attention(ctx: CheckContext, case: Case) -> None:
    """Attention over the case's ragged batch equals the reference's."""
    from crossinfer_conformance.context import torch_dtype

    gen = ctx.generator(case.id)
    dtype, kv_dtype = torch_dtype(case.dtype), torch_dtype(case.cache_dtype)
    new = [n for _, n in case.seqs]
    layout = random_layout([c + n for c, n in case.seqs], case.block_size, gen)
    shape = (sum(layout.seq_lens), KV_HEADS, case.head_size)
    keys = torch.randn(shape, generator=gen).to(dtype)
    values = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(sum(new), case.num_heads, case.head_size, generator=gen).to(dtype)

    backend, device = ctx.backend, ctx.device()
    spec = KVCacheSpec(1, KV_HEADS, case.head_size, case.block_size, kv_dtype)
    (cache,) = backend.allocate_kv_cache(spec, layout.num_blocks)
    batch, cache = _write_context(ctx, cache, layout, (keys, values), case.seqs)
    out = backend.attention(query.to(device), cache, batch, case.head_size**-0.5)
    backend.synchronize()

    _check_output(out, query, device)
    stored_k, stored_v = _stored(ctx, cache, layout, keys, values)
    expected = reference_attention(query, stored_k, stored_v, layout, new)
    assert_close(out, expected, case.dtype, "attention", describe_rows=row_describer(case.seqs))


def _write_context(
    ctx: CheckContext,
    cache: torch.Tensor,
    layout: Layout,
    kv: tuple[torch.Tensor, torch.Tensor],
    seqs: Seqs,
) -> tuple[AttentionBatch, torch.Tensor]:
    """Write the cached tokens as earlier steps did, then this step's; return its batch.
    ``kv`` holds every context token, sequence after sequence."""
    device = ctx.device()
    cached_rows: list[int] = []
    cached_slots: list[int] = []
    new_rows: list[int] = []
    start = 0
    for seq, (cached, new) in enumerate(seqs):
        cached_rows += range(start, start + cached)
        cached_slots += layout.slots(seq, range(cached))
        new_rows += range(start + cached, start + cached + new)
        start += cached + new
    if cached_rows:
        slots = torch.tensor(cached_slots, dtype=torch.int64, device=device)
        cache = _write(ctx, cache, kv, cached_rows, slots)
    tables = [list(t) for t in layout.tables]
    query_lens = [n for _, n in seqs]
    batch = build_attention_batch(query_lens, layout.seq_lens, tables, layout.block_size, device)
    cache = _write(ctx, cache, kv, new_rows, batch.slot_mapping)
    return batch, cache


def _write(
    ctx: CheckContext,
    cache: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    rows: list[int],
    slots: torch.Tensor,
) -> torch.Tensor:
    index = torch.tensor(rows, dtype=torch.int64)
    keys, values = (t[index].to(slots.device) for t in kv)
    return write(ctx.backend, keys, values, cache, slots)


def _check_output(out: torch.Tensor, query: torch.Tensor, device: torch.device) -> None:
    if out.dtype != query.dtype:
        raise CheckFailed(f"attention returned {out.dtype}; it must return the query's dtype")
    if out.device.type != device.type:
        raise CheckFailed(f"attention returned a tensor on {out.device}, not on {device}")


def _stored(
    ctx: CheckContext, cache: torch.Tensor, layout: Layout, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return read_back(ctx.backend, cache, layout.context_slots())
    except NotSupported:
        return keys, values


def row_describer(seqs: Seqs) -> Callable[[tuple[int, ...]], str]:
    """Name query rows by sequence and position, and say when they are all last tokens."""
    owners: list[tuple[int, int, bool]] = []
    for seq, (cached, new) in enumerate(seqs):
        owners += [(seq, cached + j, j == new - 1) for j in range(new)]

    def describe(rows: tuple[int, ...]) -> str:
        named = [owners[r] for r in rows]
        text = ", ".join(
            f"seq {seq} pos {pos}{' (last)' if last else ''}" for seq, pos, last in named[:8]
        )
        if len(named) > 8:
            text += f" and {len(named) - 8} more"
        if all(last for _, _, last in named):
            lasts = sum(1 for _, _, last in owners if last)
            text += f" -- each is the last token of its sequence ({len(named)} of {lasts})"
        return text

    return describe
