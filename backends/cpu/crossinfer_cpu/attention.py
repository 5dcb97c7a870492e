"""Paged attention in plain PyTorch.

The cache of one layer is ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (keys, then
values). Attention gathers each sequence's blocks into a padded dense tensor and runs
``scaled_dot_product_attention`` with a causal mask built from positions. Decode rows (one query
token) and prefill rows are batched separately, so a batch of many decodes and one long prefill
does not pad every decode to the prefill's length.

Grouped-query attention folds the query heads that share a KV head into the query length
(``[seqs, kv_heads, group * q_len, dim]``), so keys and values are never repeated in memory.

Everything that depends only on the batch (which rows go where, the masks) is an
:class:`AttentionPlan`, built once per step and reused by every layer.

Rows of an fp32 or bf16 cache take a faster path when the native kernels could be built
(native.py): decode rows paged_decode.c, prefill rows (head sizes a multiple of 16 up to 256)
paged_prefill.c, both reading keys and values in place through the block table instead of
gathering them; the prefill kernel also skips the causal mask's masked half.

The cache may be narrower than the activations (``--kv-cache-dtype bfloat16`` under an fp32
model): keys and values are rounded as they are written and widened as they are read; the
arithmetic stays in the activations' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from crossinfer.backend import AttentionBatch
from crossinfer_cpu import native


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_kv_heads, head_size = kv_cache.shape[-2:]
    lib = native.library()
    native_slots = slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    if lib is not None and native_slots and _native_layout(kv_cache, key, value):
        write = lib.write_kv_bf16 if kv_cache.dtype == torch.bfloat16 else lib.write_kv
        write(
            kv_cache.data_ptr(),
            kv_cache.shape[1] * kv_cache.shape[2],
            num_kv_heads * head_size,
            key.data_ptr(),
            key.stride(0),
            value.data_ptr(),
            value.stride(0),
            slot_mapping.data_ptr(),
            slot_mapping.shape[0],
            torch.get_num_threads(),
        )
        return
    key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)  # a narrower cache rounds
    kv_cache[0].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, value)


def read_kv(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_kv_heads, head_size = kv_cache.shape[-2:]
    keys = kv_cache[0].view(-1, num_kv_heads, head_size)[slots]
    values = kv_cache[1].view(-1, num_kv_heads, head_size)[slots]
    return keys, values


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
    src, dst = src_to_dst[:, 0], src_to_dst[:, 1]
    for kv_cache in kv_caches:
        kv_cache[:, dst] = kv_cache[:, src]


@dataclass(frozen=True)
class _Group:
    """Sequences attended together, padded to their longest query and context."""

    kv_rows: torch.Tensor  # [2 * seqs * blocks] int64: key rows, then value rows, of the blocks
    rows: torch.Tensor  # [seqs, max_query] query row of each (seq, offset); 0 where padded
    valid: torch.Tensor  # [seqs, max_query] bool: offset < the sequence's query length
    flat_rows: torch.Tensor  # rows[valid]
    mask: torch.Tensor  # [seqs, 1, group * max_query, ctx] bool, True = may attend
    contiguous: slice | None  # the rows as a slice when they are one unpadded run
    native: _NativeInputs | None  # the group's inputs for the native kernels


@dataclass(frozen=True)
class _NativeInputs:
    rows: torch.Tensor  # [seqs] int64: first query row of each sequence
    block_table: torch.Tensor  # [seqs, blocks] int32, contiguous
    seq_lens: torch.Tensor  # [seqs] int32
    query_lens: torch.Tensor  # [seqs] int32


@dataclass(frozen=True)
class AttentionPlan:
    groups: tuple[_Group, ...]
    per_kv: int  # query heads per KV head


def plan(batch: AttentionBatch, num_blocks: int, block_size: int, per_kv: int) -> AttentionPlan:
    """Split the batch into a decode group and a prefill group and precompute their indices."""
    starts = [0, *accumulate(batch.query_lens_cpu)]
    decodes = [i for i, n in enumerate(batch.query_lens_cpu) if n == 1]
    prefills = [i for i, n in enumerate(batch.query_lens_cpu) if n > 1]
    groups = tuple(
        _group(batch, seqs, starts, (num_blocks, block_size), per_kv)
        for seqs in (decodes, prefills)
        if seqs
    )
    return AttentionPlan(groups, per_kv)


def _group(
    batch: AttentionBatch,
    seqs: list[int],
    starts: list[int],
    cache_shape: tuple[int, int],
    per_kv: int,
) -> _Group:
    num_cache_blocks, block_size = cache_shape
    device = batch.seq_lens.device
    query_lens = [batch.query_lens_cpu[i] for i in seqs]
    seq_lens = [batch.seq_lens_cpu[i] for i in seqs]
    max_query = max(query_lens)
    num_blocks = -(-max(seq_lens) // block_size)
    seq_index = torch.tensor(seqs, device=device)
    block_table = batch.block_table[seq_index, :num_blocks].long()

    offsets = torch.arange(max_query, device=device)
    q_len = torch.tensor(query_lens, device=device)
    valid = offsets < q_len[:, None]
    rows = torch.tensor([starts[i] for i in seqs], device=device)[:, None] + offsets
    rows = torch.where(valid, rows, 0)

    q_pos = (torch.tensor(seq_lens, device=device) - q_len)[:, None] + offsets
    k_pos = torch.arange(num_blocks * block_size, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]
    if per_kv > 1:  # query heads sharing a KV head are folded into the query axis
        mask = mask.repeat(1, 1, per_kv, 1)
    first = starts[seqs[0]]
    is_run = max_query == 1 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    contiguous = slice(first, first + len(seqs)) if is_run else None
    blocks = block_table.flatten()
    kv_rows = torch.cat((blocks, blocks + num_cache_blocks))
    native_inputs = None
    if native.library() is not None:
        native_inputs = _NativeInputs(
            rows[:, 0].contiguous(),
            block_table.to(torch.int32).contiguous(),
            torch.tensor(seq_lens, dtype=torch.int32, device=device),
            q_len.to(torch.int32),
        )
    return _Group(kv_rows, rows, valid, rows[valid], mask, contiguous, native_inputs)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    attention_plan: AttentionPlan,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(query)
    for group in attention_plan.groups:
        inputs = group.native
        if inputs is None or not _native_layout(kv_cache, query, out):
            _attend(query, kv_cache, group, scale, out)
        elif group.rows.shape[1] == 1:
            native.paged_decode_attention(
                out, query, inputs.rows, kv_cache, inputs.block_table, inputs.seq_lens, scale
            )
        elif _native_prefill_takes(kv_cache):
            native.paged_prefill_attention(
                out, query, inputs.rows, inputs.query_lens, kv_cache, inputs.block_table,
                inputs.seq_lens, scale,
            )  # fmt: skip
        else:
            _attend(query, kv_cache, group, scale, out)
    return out


def _native_prefill_takes(kv_cache: torch.Tensor) -> bool:
    """paged_prefill.c's shapes: AVX-512, head sizes a multiple of 16 up to 256."""
    lib = native.library()
    head_size = kv_cache.shape[-1]
    return (
        lib is not None
        and bool(lib.paged_prefill_available())
        and head_size % 16 == 0
        and head_size <= 256
    )


def _native_layout(kv_cache: torch.Tensor, *per_token: torch.Tensor) -> bool:
    """The native kernels' layout: fp32 tokens, a contiguous fp32 or bf16 cache, and each
    token's heads contiguous in every ``[tokens, heads, head_size]`` tensor (the token stride
    may be any)."""
    head_size = kv_cache.shape[-1]
    return (
        kv_cache.dtype in (torch.float32, torch.bfloat16)
        and kv_cache.is_contiguous()
        and all(
            t.dtype == torch.float32 and t.stride(2) == 1 and t.stride(1) == head_size
            for t in per_token
        )
    )


def _attend(
    query: torch.Tensor, kv_cache: torch.Tensor, group: _Group, scale: float, out: torch.Tensor
) -> None:
    num_seqs, max_query = group.rows.shape
    num_heads, head_size = query.shape[1:]
    num_kv_heads = kv_cache.shape[3]
    per_kv = num_heads // num_kv_heads
    # One gather of whole blocks, keys and values together: index_select over the rows of a
    # [2 * blocks, block_numel] view is a parallel row copy (2.5x faster than indexing the
    # block axis of the 5-d cache on 2 cores). -> [2, seqs, ctx, kv_heads, dim]
    rows_2d = kv_cache.view(2 * kv_cache.shape[1], -1)
    kv = torch.index_select(rows_2d, 0, group.kv_rows).view(
        2, num_seqs, -1, num_kv_heads, head_size
    )
    kv = kv.to(query.dtype)  # a cache narrower than the activations is widened here
    keys, values = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [seqs, kv_heads, ctx, dim]
    # [seqs, max_query, heads, dim] -> [seqs, kv_heads, per_kv * max_query, dim]
    rows = query[group.contiguous] if group.contiguous is not None else query[group.rows]
    q = rows.reshape(num_seqs, max_query, num_kv_heads, per_kv, head_size)
    q = q.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, per_kv * max_query, head_size)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=group.mask, scale=scale)
    # back to [seqs, max_query, heads, dim]
    o = o.view(num_seqs, num_kv_heads, per_kv, max_query, head_size).permute(0, 3, 1, 2, 4)
    o = o.reshape(num_seqs, max_query, num_heads, head_size)
    if group.contiguous is not None:
        out[group.contiguous] = o.view(num_seqs, num_heads, head_size)
    else:
        out[group.flat_rows] = o[group.valid]
