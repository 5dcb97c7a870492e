"""Building the AttentionBatch of one step from host-side lists."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crossinfer.backend import AttentionBatch


def build_attention_batch(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device,
) -> AttentionBatch:
    """The batch where sequence ``i`` adds its last ``query_lens[i]`` of ``seq_lens[i]`` tokens.

    ``block_tables[i]`` lists the blocks of sequence ``i`` in order and must cover
    ``seq_lens[i]`` tokens.
    """
    num_seqs = len(query_lens)
    max_blocks = max((len(t) for t in block_tables), default=0) or 1
    rows: list[list[int]] = []  # the block table, zero-padded: one tensor built at the end
    slots: list[int] = []
    starts = [0]
    for i, (q_len, s_len, blocks) in enumerate(
        zip(query_lens, seq_lens, block_tables, strict=True)
    ):
        if len(blocks) * block_size < s_len:
            raise ValueError(f"sequence {i}: {len(blocks)} blocks cannot hold {s_len} tokens")
        rows.append([*blocks, *[0] * (max_blocks - len(blocks))])
        slots += [
            blocks[p // block_size] * block_size + p % block_size
            for p in range(s_len - q_len, s_len)
        ]
        starts.append(starts[-1] + q_len)
    return AttentionBatch(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        block_table=torch.tensor(rows, dtype=torch.int32).view(num_seqs, max_blocks).to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
    )
