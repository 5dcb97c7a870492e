"""L1 / L2 KV-cache writes and block copies, guarded by sentinels.

Both read the backend's cache back through ``read_kv``: a backend without it cannot be
checked here, and the cases say "not supported".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from crossinfer.backend import KVCacheSpec
from crossinfer_conformance import sentinels
from crossinfer_conformance.cases import KV_HEADS, Case
from crossinfer_conformance.checks.paged import HOST, read_back
from crossinfer_conformance.compare import assert_close
from crossinfer_conformance.kv_write import write
from crossinfer_conformance.outcome import CheckFailed
from crossinfer_cpu import CpuBackend

if TYPE_CHECKING:
    from crossinfer_conformance.context import CheckContext

NUM_BLOCKS = 9


def written_slots(block_size: int) -> list[int]:
    """The slots a write_kv case writes, each region with unwritten neighbours: all of block
    2, the first slots of block 5, one slot in the middle of block 7."""
    slots = [2 * block_size + i for i in range(block_size)]
    slots += [5 * block_size + i for i in range(min(5, block_size))]
    slots.append(7 * block_size + block_size // 2)
    return slots


def check_write_kv(ctx: CheckContext, case: Case) -> None:
    """write_kv stores each key and value in its slot and changes no other slot."""
    from crossinfer_conformance.context import torch_dtype

    gen = ctx.generator(case.id)
    dtype, kv_dtype = torch_dtype(case.dtype), torch_dtype(case.cache_dtype)
    bs, head = case.block_size, case.head_size
    backend, device = ctx.backend, ctx.device()
    spec = KVCacheSpec(1, KV_HEADS, head, bs, kv_dtype)
    (cache,) = backend.allocate_kv_cache(spec, NUM_BLOCKS)
    num_slots = NUM_BLOCKS * bs
    cache = sentinels.fill(backend, cache, (num_slots, KV_HEADS, head), dtype)
    every = torch.arange(num_slots, dtype=torch.int64)
    filled_k, filled_v = read_back(backend, cache, every)
    unfilled = sentinels.changed_slots(filled_k, filled_v, ())
    if unfilled:
        where = sentinels.describe_slots(unfilled, [], bs)
        raise CheckFailed(f"write_kv over every slot did not store the sentinels at {where}")

    slots = written_slots(bs)
    order = torch.randperm(len(slots), generator=gen).tolist()
    slots = [slots[i] for i in order]  # out of order, as a ragged batch's slots are
    keys = torch.randn(len(slots), KV_HEADS, head, generator=gen).to(dtype)
    values = torch.randn(len(slots), KV_HEADS, head, generator=gen).to(dtype)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    cache = write(backend, keys.to(device), values.to(device), cache, slot_mapping)
    backend.synchronize()

    stored_k, stored_v = read_back(backend, cache, every)
    sentinels.assert_untouched(stored_k, stored_v, slots, bs, "write_kv")
    index = torch.tensor(slots)
    if kv_dtype == dtype:
        _assert_exact(stored_k[index], keys, slots, bs, "keys")
        _assert_exact(stored_v[index], values, slots, bs, "values")
    else:
        assert_close(stored_k[index], keys, case.cache_dtype, "stored keys")
        assert_close(stored_v[index], values, case.cache_dtype, "stored values")


def _assert_exact(
    stored: torch.Tensor, given: torch.Tensor, slots: list[int], block_size: int, what: str
) -> None:
    if stored.dtype != given.dtype:
        raise CheckFailed(
            f"read_kv returned {what} as {stored.dtype}, the cache holds {given.dtype}"
        )
    wrong = (stored != given).flatten(1).any(dim=1).nonzero().flatten().tolist()
    if wrong:
        where = sentinels.describe_slots([slots[i] for i in wrong], slots, block_size)
        raise CheckFailed(f"write_kv did not store the {what} it was given at {where}")


def check_copy_blocks(ctx: CheckContext, case: Case) -> None:
    """copy_blocks copies whole blocks in every layer, and only the destinations change."""
    from crossinfer_conformance.context import torch_dtype

    gen = ctx.generator(case.id)
    dtype, bs, head = torch_dtype(case.dtype), case.block_size, case.head_size
    backend, device = ctx.backend, ctx.device()
    num_layers, num_blocks = 2, 8
    spec = KVCacheSpec(num_layers, KV_HEADS, head, bs, torch_dtype(case.cache_dtype))
    caches = backend.allocate_kv_cache(spec, num_blocks)
    every = torch.arange(num_blocks * bs, dtype=torch.int64)
    for layer, cache in enumerate(caches):
        shape = (num_blocks * bs, KV_HEADS, head)
        keys = torch.randn(shape, generator=gen).to(dtype).to(device)
        values = torch.randn(shape, generator=gen).to(dtype).to(device)
        caches[layer] = write(backend, keys, values, cache, every.to(device))
    # Judge the copy on what the cache held before it, whatever write_kv did.
    before = [read_back(backend, cache, every) for cache in caches]
    pairs = [(1, 4), (6, 2), (3, 7)]
    backend.copy_blocks(caches, torch.tensor(pairs, dtype=torch.int64, device=device))
    backend.synchronize()
    expected = _reference_copy(before, pairs, bs)
    for layer, cache in enumerate(caches):
        got = read_back(backend, cache, every)
        for part, name in ((0, "keys"), (1, "values")):
            _assert_blocks_equal(got[part], expected[layer][part], pairs, bs, layer, name)


def _reference_copy(
    before: list[tuple[torch.Tensor, torch.Tensor]], pairs: list[tuple[int, int]], bs: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    reference = CpuBackend()
    num_slots, num_kv_heads, head = before[0][0].shape
    spec = KVCacheSpec(len(before), num_kv_heads, head, bs, before[0][0].dtype)
    caches = reference.allocate_kv_cache(spec, num_slots // bs)
    every = torch.arange(num_slots, dtype=torch.int64)
    for cache, (keys, values) in zip(caches, before, strict=True):
        reference.write_kv(keys, values, cache, every)
    reference.copy_blocks(caches, torch.tensor(pairs, dtype=torch.int64, device=HOST))
    return [reference.read_kv(cache, every) for cache in caches]


def _assert_blocks_equal(
    got: torch.Tensor,
    expected: torch.Tensor,
    pairs: list[tuple[int, int]],
    bs: int,
    layer: int,
    what: str,
) -> None:
    differs = (got != expected).flatten(1).any(dim=1).view(-1, bs).any(dim=1)
    bad = differs.nonzero().flatten().tolist()
    if not bad:
        return
    sources = {dst: src for src, dst in pairs}
    named = [
        f"block {b} (should hold block {sources[b]}'s {what})"
        if b in sources
        else f"block {b} (not a destination, yet it changed)"
        for b in bad
    ]
    raise CheckFailed(f"copy_blocks, layer {layer}: " + "; ".join(named))
