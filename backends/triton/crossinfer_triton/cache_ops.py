"""Writing new keys and values into the paged cache, and copying whole blocks, in Triton.

Cache layout: ``[2, num_blocks, block_size, num_kv_heads, head_size]``; a slot is
``block_id * block_size + offset`` and holds ``num_kv_heads * head_size`` contiguous values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size], any strides but the last
    value_ptr,
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    slot_ptr,  # [num_tokens] int64; negative: padding, not written
    kv_plane,  # elements in the K half of the cache (offset of V)
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_SIZE)[None, :]
    k = tl.load(
        key_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :], mask
    )
    v = tl.load(
        value_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :], mask
    )
    dst = slot * (NUM_KV_HEADS * HEAD_SIZE) + heads[:, None] * HEAD_SIZE + dims[None, :]
    dtype = cache_ptr.dtype.element_ty
    tl.store(cache_ptr + dst, k.to(dtype), mask)
    tl.store(cache_ptr + kv_plane + dst, v.to(dtype), mask)


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,  # [2, num_blocks, block_numel]
    pairs_ptr,  # [num_pairs, 2] int64: source block, destination block
    kv_plane,
    BLOCK_NUMEL: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    half = tl.program_id(1).to(tl.int64)  # 0: keys, 1: values
    src = tl.load(pairs_ptr + pair * 2)
    dst = tl.load(pairs_ptr + pair * 2 + 1)
    base = half * kv_plane
    for start in range(0, BLOCK_NUMEL, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < BLOCK_NUMEL
        values = tl.load(cache_ptr + base + src * BLOCK_NUMEL + offs, mask)
        tl.store(cache_ptr + base + dst * BLOCK_NUMEL + offs, values, mask)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store ``key``/``value`` ([num_tokens, num_kv_heads, head_size]) at ``slot_mapping``."""
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    key, value = _last_dim_dense(key), _last_dim_dense(value)
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        kv_cache,
        slot_mapping,
        kv_cache[0].numel(),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_PAD=triton.next_power_of_2(head_size),
    )


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
    """Copy block ``src`` to ``dst`` for every pair, keys and values, in every layer."""
    if src_to_dst.numel() == 0:
        return
    pairs = src_to_dst.to(torch.int64).contiguous()
    for cache in kv_caches:
        block_numel = cache[0, 0].numel()
        _copy_blocks_kernel[(pairs.shape[0], 2)](
            cache,
            pairs,
            cache[0].numel(),
            BLOCK_NUMEL=block_numel,
            CHUNK=min(1024, triton.next_power_of_2(block_numel)),
        )


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
