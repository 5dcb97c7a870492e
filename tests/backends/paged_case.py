"""A paged-attention problem with its dense answer, for testing any backend's kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crossinfer.backend import AttentionBatch, Backend, KVCacheSpec
from crossinfer.engine.batch import build_attention_batch

KV_HEADS = 2


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


@dataclass(frozen=True)
class PagedCase:
    query: torch.Tensor  # [num_tokens, KV_HEADS * group, head_size]
    cache: torch.Tensor
    batch: AttentionBatch
    scale: float
    expected: torch.Tensor  # float64, from the unpaged keys and values


def paged_case(
    backend: Backend,
    shapes: list[tuple[int, int]],
    block_size: int,
    group: int,
    head_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> PagedCase:
    """Sequences given as (tokens already cached, new tokens) on shuffled blocks; earlier
    steps wrote the cached part, this step's keys are written like the engine does. A
    ``kv_dtype`` narrower than ``dtype`` rounds what is stored: the answer is computed from
    the rounded keys and values."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [done + new for done, new in shapes]
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 2
    spec = KVCacheSpec(1, KV_HEADS, head_size, block_size, kv_dtype or dtype)
    (cache,) = backend.allocate_kv_cache(spec, num_blocks)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in blocks_needed:
        tables.append(perm[at : at + n])
        at += n

    def rand(n: int, heads: int) -> torch.Tensor:
        return torch.randn(n, heads, head_size, generator=gen).to(dtype)

    keys = [rand(n, KV_HEADS) for n in seq_lens]
    values = [rand(n, KV_HEADS) for n in seq_lens]
    device = backend.device()
    dones = [done for done, _ in shapes]
    prior = build_attention_batch(dones, dones, tables, block_size, device)
    backend.write_kv(
        torch.cat([k[:done] for k, done in zip(keys, dones, strict=True)]).to(device),
        torch.cat([v[:done] for v, done in zip(values, dones, strict=True)]).to(device),
        cache,
        prior.slot_mapping,
    )
    batch = build_attention_batch([new for _, new in shapes], seq_lens, tables, block_size, device)
    backend.write_kv(
        torch.cat([k[done:] for k, done in zip(keys, dones, strict=True)]).to(device),
        torch.cat([v[done:] for v, done in zip(values, dones, strict=True)]).to(device),
        cache,
        batch.slot_mapping,
    )
    queries = [rand(new, KV_HEADS * group) for _, new in shapes]
    scale = head_size**-0.5
    stored = kv_dtype or dtype
    expected = torch.cat(
        [
            dense_attention(q, k.to(stored), v.to(stored), scale)
            for q, k, v in zip(queries, keys, values, strict=True)
        ]
    )
    return PagedCase(torch.cat(queries).to(device), cache, batch, scale, expected)


def assert_copy_blocks_copies_every_layer(backend: Backend) -> None:
    """Blocks 1 -> 3 and 0 -> 2 in two layers, keys and values; the sources stay."""
    caches = backend.allocate_kv_cache(KVCacheSpec(2, 1, 32, 2, torch.float32), 4)
    for layer, cache in enumerate(caches):
        for block in range(4):
            cache[:, block] = 10 * layer + block
    backend.copy_blocks(caches, torch.tensor([[1, 3], [0, 2]], device=backend.device()))
    for layer, cache in enumerate(caches):
        firsts = [float(cache[kv, b, 0, 0, 0]) for kv in (0, 1) for b in range(4)]
        assert firsts == [10 * layer + x for x in (0, 1, 0, 1)] * 2
        assert bool((cache[:, 3] == 10 * layer + 1).all())
