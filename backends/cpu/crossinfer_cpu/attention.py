"""Paged attention in plain PyTorch.

The cache of one layer is ``[2, num_blocks, block_size, num_kv_heads, head_size]`` (keys, then
values). Attention gathers each sequence's blocks into a padded dense tensor and runs
``scaled_dot_product_attention`` with a causal mask built from positions. Decode rows (one query
token) and prefill rows are batched separately, so a batch of many decodes and one long prefill
does not pad every decode to the prefill's length.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

from crossinfer.backend import AttentionBatch


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_kv_heads, head_size = kv_cache.shape[-2:]
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


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    out = torch.empty_like(query)
    starts = [0, *accumulate(batch.query_lens_cpu)]
    decodes = [i for i, n in enumerate(batch.query_lens_cpu) if n == 1]
    prefills = [i for i, n in enumerate(batch.query_lens_cpu) if n > 1]
    for group in (decodes, prefills):
        if group:
            _attend(query, kv_cache, batch, group, starts, scale, out)
    return out


def _attend(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionBatch,
    seqs: list[int],
    starts: list[int],
    scale: float,
    out: torch.Tensor,
) -> None:
    """Attention for the sequences ``seqs``, padded to their longest query and context."""
    device = query.device
    block_size = kv_cache.shape[2]
    query_lens = [batch.query_lens_cpu[i] for i in seqs]
    seq_lens = [batch.seq_lens_cpu[i] for i in seqs]
    max_query = max(query_lens)
    num_blocks = -(-max(seq_lens) // block_size)

    seq_index = torch.tensor(seqs, device=device)
    block_table = batch.block_table[seq_index, :num_blocks].long()
    # [num_seqs, num_kv_heads, context, head_size]
    keys = kv_cache[0][block_table].flatten(1, 2).transpose(1, 2)
    values = kv_cache[1][block_table].flatten(1, 2).transpose(1, 2)

    offsets = torch.arange(max_query, device=device)
    q_len = torch.tensor(query_lens, device=device)
    rows = torch.tensor([starts[i] for i in seqs], device=device)[:, None] + offsets
    valid = offsets < q_len[:, None]  # [num_seqs, max_query]
    rows = torch.where(valid, rows, 0)
    # [num_seqs, num_heads, max_query, head_size]
    q = query[rows].transpose(1, 2)

    q_pos = (torch.tensor(seq_lens, device=device) - q_len)[:, None] + offsets
    k_pos = torch.arange(keys.shape[2], device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [num_seqs, 1, max_query, ctx]

    o = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != keys.shape[1]
    )
    out[rows[valid]] = o.transpose(1, 2)[valid]
