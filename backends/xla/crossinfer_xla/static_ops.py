"""Paged attention, KV writes and block copies in plain torch ops, at static shapes.

Every op here has shapes that depend only on the (padded) batch's tensor shapes, never on
their values, so one compiled graph serves every step of a bucket: the reference kernels of
the compiled-graph backends (XLA devices, and the test-only static backend under
torch.compile) and the oracle their hardware kernels are checked against.

Attention: every token gathers its sequence's whole block-table row (``width * block_size``
keys), masks the keys after its own position, and attends with grouped-query heads reshaped
as ``[tokens, kv_heads, group, head]``. A padded batch names each token's sequence and
position (``AttentionBatch.token_seq`` / ``token_pos``); any other batch has them derived from
``query_start_loc`` and ``seq_lens`` with the same fixed-shape ops.

Three cache layouts (a backend picks one; all hold the same values):

- ``SPLIT``: ``[2, num_blocks, block_size, kv_heads, head]``, keys then values (the CPU and
  Triton backends' layout);
- heads first: ``[2, num_blocks, kv_heads, block_size, head]`` (vllm-neuron's layout);
- combined: ``[num_blocks, block_size, 2 * kv_heads, head_pad]``, each head's key and value
  interleaved and the head padded to ``head_pad`` (what TPU's ragged paged attention reads).

Every op reaches the cache through one view of it, ``[num_blocks, block_size, 2, kv_heads,
head]``, indexed by (block, offset) pairs, so the layout is one function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crossinfer.backend import AttentionBatch, KVCacheSpec

MASKED = -1e30  # a masked score: finite, so a token with nothing to attend to stays finite


@dataclass(frozen=True)
class KVLayout:
    """Where the keys and values of a slot live in one layer's cache tensor."""

    combined: bool = False
    heads_first: bool = False  # (split layout) kv heads before the block's slots
    head_multiple: int = 1  # the stored head size is rounded up to a multiple of this

    def stored_head(self, head_size: int) -> int:
        return -(-head_size // self.head_multiple) * self.head_multiple

    def shape(self, spec: KVCacheSpec, num_blocks: int) -> tuple[int, ...]:
        head = self.stored_head(spec.head_size)
        if self.combined:
            return (num_blocks, spec.block_size, 2 * spec.num_kv_heads, head)
        if self.heads_first:
            return (2, num_blocks, spec.num_kv_heads, spec.block_size, head)
        return (2, num_blocks, spec.block_size, spec.num_kv_heads, head)

    def blocks(self, cache: torch.Tensor) -> torch.Tensor:
        """The cache as [num_blocks, block_size, 2, kv_heads, head] (a view)."""
        if self.combined:
            num_blocks, block_size, heads2, head = cache.shape
            return cache.view(num_blocks, block_size, heads2 // 2, 2, head).transpose(2, 3)
        if self.heads_first:
            return cache.permute(1, 3, 0, 2, 4)
        return cache.permute(1, 2, 0, 3, 4)

    @property
    def block_dim(self) -> int:
        """The dimension of the cache tensor that numbers the blocks."""
        return 0 if self.combined else 1

    def block_size(self, cache: torch.Tensor) -> int:
        return int(self.blocks(cache).shape[1])


SPLIT = KVLayout()


def _padded(x: torch.Tensor, head: int) -> torch.Tensor:
    if x.shape[-1] == head:
        return x
    return torch.nn.functional.pad(x, (0, head - x.shape[-1]))


def write_kv(
    layout: KVLayout,
    key: torch.Tensor,  # [num_tokens, kv_heads, head_size]
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; padded tokens name sink slots
    in_place: bool,
) -> torch.Tensor:
    """Store the keys and values at their slots; returns the cache (the same tensor when
    ``in_place``, else a new one). Every named slot is written: a static graph cannot skip."""
    head = cache.shape[-1]
    pair = torch.stack((_padded(key, head), _padded(value, head)), dim=1).to(cache.dtype)
    target = cache if in_place else cache.clone()
    block_size = layout.block_size(target)
    # writes through the view: [num_tokens, 2, kv_heads, head] at (block, offset)
    layout.blocks(target)[slot_mapping // block_size, slot_mapping % block_size] = pair
    return target


def read_kv(
    layout: KVLayout, cache: torch.Tensor, slots: torch.Tensor, head_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = layout.block_size(cache)
    rows = layout.blocks(cache)[slots // block_size, slots % block_size]  # [n, 2, heads, head]
    return rows[:, 0, :, :head_size], rows[:, 1, :, :head_size]


def copy_blocks(layout: KVLayout, caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
    """Copy whole blocks in every layer (in place). ``src_to_dst``: [n, 2] int64."""
    src, dst = src_to_dst[:, 0], src_to_dst[:, 1]
    dim = layout.block_dim
    for cache in caches:
        cache.index_copy_(dim, dst, cache.index_select(dim, src))


def token_places(batch: AttentionBatch, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's sequence and position: the padded batch's, or derived from
    ``query_start_loc`` and ``seq_lens``. # [num_tokens] int64 each"""
    if batch.token_seq is not None and batch.token_pos is not None:
        return batch.token_seq.long(), batch.token_pos.long()
    tokens = torch.arange(num_tokens, device=batch.seq_lens.device)
    ends = batch.query_start_loc[1:].long()
    seq = torch.searchsorted(ends, tokens, right=True)
    seq = seq.clamp(max=batch.num_seqs - 1)
    # The chunk's tokens are the last of the sequence: position = seq_len - (end - token).
    pos = batch.seq_lens.long().index_select(0, seq) - (ends.index_select(0, seq) - tokens)
    return seq, pos.clamp(min=0)


def attention(
    layout: KVLayout,
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Causal attention of every token over its sequence's cached keys, up to its own
    position; grouped-query heads. Returns [num_tokens, num_heads, head_size]."""
    num_tokens, num_heads, head_size = query.shape
    block_size = layout.block_size(cache)
    table = batch.block_table.long()  # [num_seqs, width]
    length = table.shape[1] * block_size
    seq, pos = token_places(batch, num_tokens)
    offsets = torch.arange(block_size, device=table.device)
    rows = table.index_select(0, seq)  # [num_tokens, width]
    # [num_tokens, width, block_size, 2, kv_heads, head]: each token's sequence, in order
    kv = layout.blocks(cache)[rows[:, :, None], offsets[None, None, :]]
    kv_heads = kv.shape[-2]
    kv = kv[..., :head_size].reshape(num_tokens, length, 2, kv_heads, head_size).float()
    q = query.float().view(num_tokens, kv_heads, num_heads // kv_heads, head_size)
    scores = torch.einsum("thgd,tlhd->thgl", q, kv[:, :, 0]) * scale
    visible = torch.arange(length, device=table.device)[None, :] <= pos[:, None]  # [T, L]
    scores = scores.masked_fill(~visible[:, None, None, :], MASKED)
    out = torch.einsum("thgl,tlhd->thgd", scores.softmax(dim=-1), kv[:, :, 1])
    return out.reshape(num_tokens, num_heads, head_size).to(query.dtype)
