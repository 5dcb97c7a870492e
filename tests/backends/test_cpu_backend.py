"""The CPU backend's kernels against a dense, unpaged attention reference."""

from __future__ import annotations

import itertools
import socket

import pytest
import torch
import torch.multiprocessing as mp

from crossinfer.backend import KVCacheSpec
from crossinfer.engine.batch import build_attention_batch
from crossinfer_cpu import CpuBackend


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [q_len, heads, dim] = the last q_len of the k/v: [ctx, kv_heads, dim] positions."""
    q_len, heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    group = heads // kv_heads
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# (context before this step, new tokens): a full prefill, a prefill after a cached prefix,
# decodes, and a decode whose last block is partly filled (added per block size).
SHAPES = [(0, 19), (37, 6), (50, 1), (1, 1)]


@pytest.mark.parametrize(
    "block_size,group,head_size",
    list(itertools.product([1, 16, 32], [1, 3, 4], [64, 128])),
)
def test_paged_attention_matches_dense(block_size: int, group: int, head_size: int) -> None:
    backend = CpuBackend()
    gen = torch.Generator().manual_seed(block_size * 100 + group * 10 + head_size)
    kv_heads, heads = 2, 2 * group
    shapes = [*SHAPES, (block_size * 2, 1)]
    seq_lens = [done + new for done, new in shapes]
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 2
    spec = KVCacheSpec(1, kv_heads, head_size, block_size, torch.float32)
    (cache,) = backend.allocate_kv_cache(spec, num_blocks)
    perm = (torch.randperm(num_blocks, generator=gen)).tolist()
    tables, at = [], 0
    for n in blocks_needed:
        tables.append(perm[at : at + n])
        at += n

    keys = [torch.randn(n, kv_heads, head_size, generator=gen) for n in seq_lens]
    values = [torch.randn(n, kv_heads, head_size, generator=gen) for n in seq_lens]
    # The cached context was written by earlier steps.
    prior = build_attention_batch(
        [done for done, _ in shapes], [done for done, _ in shapes], tables, block_size, "cpu"
    )
    backend.write_kv(
        torch.cat([k[:done] for k, (done, _) in zip(keys, shapes, strict=True)]),
        torch.cat([v[:done] for v, (done, _) in zip(values, shapes, strict=True)]),
        cache,
        prior.slot_mapping,
    )
    batch = build_attention_batch([new for _, new in shapes], seq_lens, tables, block_size, "cpu")
    backend.write_kv(
        torch.cat([k[done:] for k, (done, _) in zip(keys, shapes, strict=True)]),
        torch.cat([v[done:] for v, (done, _) in zip(values, shapes, strict=True)]),
        cache,
        batch.slot_mapping,
    )
    queries = [torch.randn(new, heads, head_size, generator=gen) for _, new in shapes]
    scale = head_size**-0.5
    out = backend.attention(torch.cat(queries), cache, batch, scale)

    expected = torch.cat(
        [dense_attention(q, k, v, scale) for q, k, v in zip(queries, keys, values, strict=True)]
    )
    assert out.shape == (sum(n for _, n in shapes), heads, head_size)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-4)


def test_write_kv_touches_only_named_slots() -> None:
    backend = CpuBackend()
    spec = KVCacheSpec(1, 2, 64, 4, torch.float32)
    (cache,) = backend.allocate_kv_cache(spec, 3)
    cache.fill_(7.0)
    slots = torch.tensor([5, 6], dtype=torch.int64)
    key = torch.randn(2, 2, 64)
    backend.write_kv(key, -key, cache, slots)
    got_k, got_v = backend.read_kv(cache, slots)
    assert torch.equal(got_k, key) and torch.equal(got_v, -key)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[[5, 6]] = False
    assert bool((cache.view(2, 12, 2, 64)[:, untouched] == 7.0).all())


def test_copy_blocks_copies_keys_and_values_in_every_layer() -> None:
    backend = CpuBackend()
    spec = KVCacheSpec(2, 1, 32, 2, torch.float32)
    caches = backend.allocate_kv_cache(spec, 4)
    for layer, cache in enumerate(caches):
        for block in range(4):
            cache[:, block] = 10 * layer + block
    backend.copy_blocks(caches, torch.tensor([[1, 3], [0, 2]]))
    for layer, cache in enumerate(caches):
        firsts = [float(cache[kv, b, 0, 0, 0]) for kv in (0, 1) for b in range(4)]
        base = 10 * layer
        assert firsts == [base + x for x in (0, 1, 0, 1)] * 2


def test_kv_cache_bytes_match_spec() -> None:
    spec = KVCacheSpec(
        num_layers=3, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.bfloat16
    )
    caches = CpuBackend().allocate_kv_cache(spec, 5)
    total = sum(c.numel() * c.element_size() for c in caches)
    assert total == 5 * spec.bytes_per_block == 5 * 3 * 2 * 16 * 2 * 64 * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int, results: dict) -> None:
    comm = CpuBackend().communicator(rank, 2, f"tcp://127.0.0.1:{port}")
    try:
        reduced = comm.all_reduce(torch.tensor([1.0, 2.0]) * (rank + 1))
        gathered = comm.all_gather(torch.tensor([[rank]]), dim=1)
        sent = comm.broadcast(torch.tensor([rank + 5]), src=1)
        comm.barrier()
        results[rank] = (reduced.tolist(), gathered.tolist(), sent.tolist())
    finally:
        comm.close()


def test_gloo_communicator_world_size_two() -> None:
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank] == ([3.0, 6.0], [[0, 1]], [6])


def test_probe_and_memory_are_honest() -> None:
    backend = CpuBackend()
    probe = backend.probe()
    assert probe.available and probe.reason == "" and len(probe.devices) == 1
    mem = backend.memory_info()
    assert 0 < mem.free_bytes <= mem.total_bytes
