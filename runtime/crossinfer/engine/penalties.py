"""Repetition, presence and frequency penalties over a batch of logits rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _flat_positions(
    rows: Sequence[int], token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Index of each (row, token) pair in the flattened [num_rows * vocab] logits."""
    # Built on the host, one small tensor per row, then moved in one copy.
    per_row = [
        torch.as_tensor(ids, dtype=torch.long) + row * vocab_size
        for row, ids in zip(rows, token_ids, strict=True)
    ]
    return torch.cat(per_row).to(device)  # [total_tokens]


def apply_penalties_(
    logits: torch.Tensor,  # [num_rows, vocab], float, contiguous; modified in place
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    repetition_penalties: Sequence[float],
    presence_penalties: Sequence[float],
    frequency_penalties: Sequence[float],
) -> None:
    """Penalise ``logits`` in place, one entry per row in each sequence.

    For row i and every token t:

    - repetition (HF / vLLM): if t occurs in the prompt or the output, a positive logit is
      divided by ``repetition_penalties[i]`` and a negative one multiplied by it;
    - then presence and frequency (OpenAI), over the OUTPUT tokens only:
      ``logit -= presence * (count > 0) + frequency * count``.

    Only the (row, token) pairs that occur in a history are touched, so the cost follows the
    history lengths of the rows that use a penalty, not num_rows * vocab.
    """
    vocab = logits.shape[1]
    flat = logits.view(-1)  # aliases logits
    device, dtype = logits.device, logits.dtype
    rep_rows = [i for i, r in enumerate(repetition_penalties) if r != 1.0]
    if rep_rows:
        prompts = _flat_positions(rep_rows, [prompt_token_ids[i] for i in rep_rows], vocab, device)
        outputs = _flat_positions(rep_rows, [output_token_ids[i] for i in rep_rows], vocab, device)
        positions = torch.unique(torch.cat([prompts, outputs]))
        penalties = torch.tensor(repetition_penalties, dtype=dtype, device=device)
        penalty = penalties.index_select(0, positions // vocab)
        values = flat.index_select(0, positions)
        flat.index_copy_(0, positions, torch.where(values > 0, values / penalty, values * penalty))
    count_rows = [
        i
        for i, (p, f) in enumerate(zip(presence_penalties, frequency_penalties, strict=True))
        if p != 0.0 or f != 0.0
    ]
    if count_rows:
        outputs = _flat_positions(
            count_rows, [output_token_ids[i] for i in count_rows], vocab, device
        )
        positions, counts = torch.unique(outputs, return_counts=True)
        rows = positions // vocab
        presence = torch.tensor(presence_penalties, dtype=dtype, device=device)
        frequency = torch.tensor(frequency_penalties, dtype=dtype, device=device)
        deltas = presence.index_select(0, rows) + frequency.index_select(0, rows) * counts
        flat.index_add_(0, positions, deltas.neg_())
