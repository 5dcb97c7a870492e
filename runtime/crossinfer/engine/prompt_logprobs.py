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
    hidden: torch.Tensor,  # [step_rows, hidden]
    first_row: int,  # row first_row + i precedes target_ids[i]
    target_ids: Sequence[int],
    num_top: int,
    fixed_top: int | None = None,
) -> tuple[SampledToken, ...]:
    """Each target's logprob and rank, and the ``num_top`` best tokens at its position.
    ``fixed_top`` (for compiled backends): every slice is ROWS_PER_SLICE rows (padded by
    repeating its last row) and the best ``fixed_top`` are taken, then cut to ``num_top``, so
    one graph serves every prompt length and every ``num_top`` up to it."""
    fixed_shape = fixed_top is not None
    scored: list[SampledToken] = []
    device = hidden.device
    for begin in range(0, len(target_ids), ROWS_PER_SLICE):
        targets = list(target_ids[begin : begin + ROWS_PER_SLICE])
        count = len(targets)
        rows = list(range(first_row + begin, first_row + begin + count))
        if fixed_shape:
            rows += [rows[-1]] * (ROWS_PER_SLICE - count)
            targets += [targets[-1]] * (ROWS_PER_SLICE - count)
        picked = hidden.index_select(0, torch.tensor(rows, dtype=torch.long, device=device))
        wanted = torch.tensor(targets, dtype=torch.long, device=device)
        logprobs = torch.log_softmax(compute_logits(picked).float(), dim=-1)  # [rows, vocab]
        chosen = logprobs.gather(1, wanted[:, None])  # [rows, 1]
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top_ids: list[list[int]] = [[] for _ in range(count)]
        top_values: list[list[float]] = [[] for _ in range(count)]
        k = fixed_top if fixed_top is not None else num_top
        if num_top > 0 and k > 0:
            top = logprobs.topk(k, dim=-1)
            top_ids = [ids[:num_top] for ids in top.indices.tolist()[:count]]
            top_values = [values[:num_top] for values in top.values.tolist()[:count]]
        for target, value, rank, ids, values in zip(
            targets[:count],
            chosen.squeeze(1).tolist()[:count],
            ranks.tolist()[:count],
            top_ids,
            top_values,
            strict=True,
        ):
            scored.append(SampledToken(target, value, tuple(zip(ids, values, strict=True)), rank))
    return tuple(scored)
