"""Paged attention over a ragged batch, in Triton.

One kernel serves every row kind the engine sends in one step: whole prompts, prompt chunks
after a cached prefix, and decodes. A program owns one sequence, one tile of its new tokens
and one KV head; its query tile holds every query head of that KV head (grouped-query
attention without repeating K/V), so tile row ``r`` is token ``r // group`` and head
``r % group`` of the group. Keys and values are read in place from the paged cache, a
``BLOCK_N``-token tile at a time, with an online softmax in fp32.

Long contexts at small batch leave most of the GPU idle with one program per (sequence,
head). The split-K path (flash-decoding) gives each program a slice of the context and a
second kernel merges the slices' partial results by their softmax statistics.

The cache layout is the backend's: ``[2, num_blocks, block_size, num_kv_heads, head_size]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from crossinfer.backend import AttentionBatch
from crossinfer_triton.tiles import AttentionTiles

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size], or unused when NUM_SPLITS > 1
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_PAD] fp32 when NUM_SPLITS > 1
    part_stats_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] fp32: running max, running sum
    q_ptr,  # [num_tokens, num_heads, head_size]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_size]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_ptr,  # [num_seqs + 1] int32
    scale_log2,  # softmax scale times log2(e): the kernel works in base 2
    kv_plane,  # elements in the K half of the cache (offset of V)
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_table,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    group: tl.constexpr = NUM_HEADS // NUM_KV_HEADS

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_cached = seq_len - q_len  # context tokens before this step's new ones

    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // group  # [BLOCK_M] index among the new tokens
    head = kv_head * group + rows % group
    row_ok = (rows < BLOCK_Q * group) & (tok < q_len)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_SIZE
    q_offs = (q_start + tok)[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = num_cached + tok  # [BLOCK_M] absolute position of each row's token

    # Causal: the tile's last token sees up to its own position.
    kv_end = tl.minimum(seq_len, num_cached + (q_tile + 1) * BLOCK_Q)
    kv_lo = 0
    kv_hi = kv_end
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = split * per_split
        kv_hi = tl.minimum(kv_end, kv_lo + per_split)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + cols  # [BLOCK_N] key positions
        pos_ok = pos < kv_hi
        block = tl.load(block_table_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=pos_ok)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_offs = slot[:, None] * (NUM_KV_HEADS * HEAD_SIZE) + kv_head * HEAD_SIZE + dims[None, :]
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + kv_plane + kv_offs, mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if q.dtype == tl.float32:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        visible = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores * scale_log2, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # A row that has seen no visible key yet keeps -inf; subtract 0 instead of -inf.
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - ref[:, None])
        rescale = tl.exp2(row_max - ref)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        if v.dtype == tl.float32:
            pv = tl.dot(probs, v, input_precision="ieee")
        else:
            pv = tl.dot(probs.to(v.dtype), v)
        acc = acc * rescale[:, None] + pv
        row_max = new_max

    token_row = q_start + tok
    if NUM_SPLITS == 1:
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        o_offs = token_row[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
        o_mask = row_ok[:, None] & dim_ok[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        part = (token_row * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(part_acc_ptr + part[:, None] * HEAD_PAD + dims[None, :], acc, row_ok[:, None])
        tl.store(part_stats_ptr + part * 2, row_max, mask=row_ok)
        tl.store(part_stats_ptr + part * 2 + 1, row_sum, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_PAD]
    part_stats_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2]
    stride_o_tok,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    part = (token * NUM_HEADS + head) * NUM_SPLITS + splits  # [SPLITS_PAD]
    maxes = tl.load(part_stats_ptr + part * 2, mask=split_ok, other=float("-inf"))
    sums = tl.load(part_stats_ptr + part * 2 + 1, mask=split_ok, other=0.0)
    top = tl.max(maxes, 0)
    # Empty splits (max -inf) weigh nothing.
    weights = tl.where(maxes == float("-inf"), 0.0, tl.exp2(maxes - top))
    dims = tl.arange(0, HEAD_PAD)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_PAD + dims[None, :], split_ok[:, None], 0.0)
    total = tl.sum(sums * weights, 0)
    out = tl.sum(acc * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_offs = token * stride_o_tok + head * stride_o_head + dims
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_SIZE)


def num_splits(
    batch: AttentionBatch, num_kv_heads: int, num_cores: int, tiles: AttentionTiles
) -> int:
    """How many context slices each (sequence, KV head) of a decode batch gets: enough
    programs to fill ``num_cores`` compute units, only for long contexts, never for prefill."""
    if batch.max_query_len != 1 or batch.max_seq_len < tiles.split_min_context:
        return 1
    programs = batch.num_seqs * num_kv_heads
    wanted = triton.cdiv(num_cores, programs)
    by_length = triton.cdiv(batch.max_seq_len, tiles.split_min_context // 2)
    return max(1, min(wanted, by_length, tiles.max_splits))


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    tiles: AttentionTiles,
    splits: int = 1,
) -> torch.Tensor:
    """Causal attention of ``query`` ([num_tokens, num_heads, head_size]) over the paged
    ``kv_cache``; see :meth:`crossinfer.backend.Backend.attention`. ``splits`` > 1 runs the
    split-K path (every sequence must then bring exactly one new token)."""
    num_tokens, num_heads, head_size = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    block_m = tiles.block_m if batch.max_query_len <= 1 else tiles.block_m_prefill
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    head_pad = triton.next_power_of_2(head_size)
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    if splits > 1:
        part_acc = query.new_empty((num_tokens, num_heads, splits, head_pad), dtype=torch.float32)
        part_stats = query.new_empty((num_tokens, num_heads, splits, 2), dtype=torch.float32)
    else:
        part_acc = part_stats = out  # not read
    grid = (batch.num_seqs, triton.cdiv(batch.max_query_len, block_q), num_kv_heads * splits)
    _attention_kernel[grid](
        out,
        part_acc,
        part_stats,
        query,
        kv_cache,
        batch.block_table,
        batch.seq_lens,
        batch.query_start_loc,
        scale * LOG2E,
        kv_cache[0].numel(),
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        batch.block_table.stride(0),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=tiles.block_n,
        NUM_SPLITS=splits,
        DOT_FP32=tiles.dot_fp32,
        **tiles.launch_options(),
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out,
            part_acc,
            part_stats,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad,
            NUM_SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
        )
    return out
