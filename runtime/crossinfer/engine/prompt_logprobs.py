"""Log-probabilities of given tokens (a prompt's), from the hidden states that precede them.

The hidden state at position ``p`` gives the distribution of token ``p + 1``; the first
prompt token has no such state, so its entry is None (as in OpenAI's echo and vLLM's
``prompt_logprobs``). Rows are scored in slices, so a long prompt never holds more than
``ROWS_PER_SLICE`` rows of vocabulary-sized logits at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from crossinfer.engine.sampler import SampledToken

ROWS_PER_SLICE = 256  # 256 x a 50k vocabulary in fp32: 50 MB of logits at a time


@dataclass(frozen=True)
class PromptScores:
    """Scores of consecutive prompt tokens, computed by one step's chunk."""

    start: int  # prompt index of the first scored token (>= 1)
    tokens: tuple[SampledToken, ...]  # one per prompt token from ``start`` on


def score_tokens(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,  # [num_rows, hidden]: row i precedes target_ids[i]
    target_ids: Sequence[int],
    num_top: int,
) -> tuple[SampledToken, ...]:
    """Each target's logprob and rank, and the ``num_top`` best tokens at its position."""
    scored: list[SampledToken] = []
    for begin in range(0, len(target_ids), ROWS_PER_SLICE):
        rows = hidden[begin : begin + ROWS_PER_SLICE]
        targets = torch.tensor(
            target_ids[begin : begin + ROWS_PER_SLICE], dtype=torch.long, device=hidden.device
        )
        logprobs = torch.log_softmax(compute_logits(rows).float(), dim=-1)  # [rows, vocab]
        chosen = logprobs.gather(1, targets[:, None])  # [rows, 1]
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top_ids: list[list[int]] = [[] for _ in range(len(targets))]
        top_values: list[list[float]] = [[] for _ in range(len(targets))]
        if num_top > 0:
            top = logprobs.topk(num_top, dim=-1)
            top_ids, top_values = top.indices.tolist(), top.values.tolist()
        for target, value, rank, ids, values in zip(
            targets.tolist(),
            chosen.squeeze(1).tolist(),
            ranks.tolist(),
            top_ids,
            top_values,
            strict=True,
        ):
            scored.append(SampledToken(target, value, tuple(zip(ids, values, strict=True)), rank))
    return tuple(scored)
