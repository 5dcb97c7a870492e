"""Padding a step to a compiled backend's buckets (``StaticShapes``).

A compiled graph exists per tensor shape, so every step is padded to a shape out of a small
set: the smallest token bucket that holds its tokens, the smallest sequence bucket that holds
its sequences, the narrowest block-table width that holds its longest sequence. Padded tokens
write into the sink block (never a live one) and attend to position 0 of the last sequence
slot; padded sequences have no tokens, a zero context and a row of sink blocks. The host
integers of the batch are the bucket's, so nothing the graph sees depends on the step. Logits
are taken at a padded list of rows (one per sequence slot), and the runner keeps the real ones.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crossinfer.backend import AttentionBatch, StaticShapes
from crossinfer.engine.scheduler import ScheduledChunk


@dataclass(frozen=True)
class StepShape:
    """One compiled shape: padded tokens, sequence slots, block-table width."""

    num_tokens: int
    num_seqs: int
    width: int


@dataclass(frozen=True)
class PaddedStep:
    """A step's model inputs at a bucket's shape."""

    shape: StepShape
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    batch: AttentionBatch
    logits_indices: torch.Tensor  # [num_seqs] int64: the row each sequence slot samples from
    num_sampling: int  # the first num_sampling logits rows are real


def pick(buckets: Sequence[int], needed: int, what: str) -> int:
    """The smallest bucket that holds ``needed``."""
    index = bisect.bisect_left(buckets, needed)
    if index == len(buckets):
        largest = buckets[-1]
        raise ValueError(f"a step needs {needed} {what}, more than the largest bucket {largest}")
    return buckets[index]


def step_shape(chunks: Sequence[ScheduledChunk], shapes: StaticShapes) -> StepShape:
    """The bucket a step of these chunks runs at: a decode bucket when the backend has them
    and every chunk is one token, else a token bucket and a sequence bucket."""
    num_tokens = sum(c.num_new_tokens for c in chunks)
    width = pick(
        shapes.block_table_widths,
        max((len(c.block_ids) for c in chunks), default=1),
        "blocks per sequence",
    )
    if shapes.decode_buckets and num_tokens == len(chunks):
        seqs = pick(shapes.decode_buckets, len(chunks), "decoding sequences")
        return StepShape(seqs, seqs, width)
    return StepShape(
        pick(shapes.token_buckets, num_tokens, "tokens"),
        pick(shapes.seq_buckets, len(chunks), "sequences"),
        width,
    )


def build_padded_step(
    chunks: Sequence[ScheduledChunk],
    shapes: StaticShapes,
    block_size: int,
    device: torch.device,
    shape: StepShape | None = None,
) -> PaddedStep:
    """The step of ``chunks`` padded to its bucket (or to ``shape``, for a warm-up step with
    no chunks at all)."""
    shape = shape or step_shape(chunks, shapes)
    sink = shapes.pad_block
    ids: list[int] = []
    positions: list[int] = []
    token_seq: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    table = [[sink] * shape.width for _ in range(shape.num_seqs)]
    sampling_rows: list[int] = []
    for i, chunk in enumerate(chunks):
        start, end = chunk.num_computed_tokens, chunk.num_computed_tokens + chunk.num_new_tokens
        blocks = chunk.block_ids
        ids += chunk.request.token_ids[start:end]
        positions += range(start, end)
        token_seq += [i] * chunk.num_new_tokens
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
        starts.append(starts[-1] + chunk.num_new_tokens)
        seq_lens.append(end)
        table[i][: len(blocks)] = blocks
        if chunk.samples:
            sampling_rows.append(starts[-1] - 1)
    num_pad = shape.num_tokens - len(ids)
    ids += [0] * num_pad
    positions += [0] * num_pad
    token_seq += [shape.num_seqs - 1] * num_pad
    slots += [sink * block_size + k % block_size for k in range(num_pad)]  # the sink's slots
    starts += [starts[-1]] * (shape.num_seqs - len(chunks))
    seq_lens += [0] * (shape.num_seqs - len(chunks))
    num_sampling = len(sampling_rows)
    sampling_rows += [0] * (shape.num_seqs - num_sampling)

    def tensor(values: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    batch = AttentionBatch(
        query_start_loc=tensor(starts),
        seq_lens=tensor(seq_lens),
        block_table=tensor([v for row in table for v in row]).view(shape.num_seqs, shape.width),
        slot_mapping=tensor(slots, torch.int64),
        max_query_len=shape.num_tokens,
        max_seq_len=shape.width * block_size,
        query_lens_cpu=(),
        seq_lens_cpu=(),
        token_seq=tensor(token_seq),
        token_pos=tensor(positions),
    )
    return PaddedStep(
        shape=shape,
        input_ids=tensor(ids, torch.int64),
        positions=tensor(positions, torch.int64),
        batch=batch,
        logits_indices=tensor(sampling_rows, torch.int64),
        num_sampling=num_sampling,
    )


def all_shapes(shapes: StaticShapes) -> list[StepShape]:
    """Every shape a step can take: what the warm-up compiles. The decode shapes first; then,
    as a step of ``n`` sequences has at least ``n`` tokens, each sequence bucket with the
    token buckets that can hold the fewest sequences it takes."""
    widths = shapes.block_table_widths
    result = [StepShape(n, n, w) for n in shapes.decode_buckets or () for w in widths]
    fewest = 1
    for seqs in shapes.seq_buckets:
        for tokens in shapes.token_buckets:
            if tokens >= fewest:
                result += [StepShape(tokens, seqs, w) for w in widths]
        fewest = seqs + 1
    return list(dict.fromkeys(result))  # a decode shape may also be a prefill shape
