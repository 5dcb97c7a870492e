"""The batched sampler: last-token logits of one engine step -> one token per row.

Order of operations (vLLM / HF semantics):

1. min_tokens: EOS and ``stop_token_ids`` are banned (-inf) while a row is shorter than
   ``params.min_tokens``; ``logit_bias`` is added;
2. penalties (engine/penalties.py): repetition over prompt + output, presence / frequency
   over the output; then a row under a grammar (structured outputs, engine/grammar.py) has
   every token its grammar does not allow next set to -inf;
3. a row left without a finite logit (the model produced NaN, or every token is banned)
   cannot be sampled: ``SamplingError`` names such rows before any random draw, so the
   caller can fail their requests and sample the others unchanged;
4. greedy rows take the argmax; the others are divided by their temperature, truncated by
   top-k, then top-p (renormalised over the top-k survivors), then min-p, and sampled
   (engine/random_sampling.py).

Logprobs are the log-softmax of the logits after steps 1-2 (the grammar's mask included) and
before step 4: they describe
the distribution the request asked for (penalties included), independent of temperature and
truncation, so greedy and sampled requests report comparable numbers.

A seeded row draws from its own generator and is sampled by computations on its own row
only, so it gets the same tokens whatever else is in the batch and at any row index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crossinfer.engine.penalties import apply_penalties_
from crossinfer.engine.random_sampling import put_rows, sample_random, take_rows
from crossinfer.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """One row of a step's logits: the request's parameters and token history."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far, excluding this step's
    generator: torch.Generator | None  # from make_generator(params.seed); None = global RNG
    eos_token_ids: Sequence[int] = ()  # banned with stop_token_ids until min_tokens is reached
    allowed: torch.Tensor | None = None
    """The tokens a grammar allows next, packed as xgrammar's bitmask row (int32
    ``[ceil(vocab / 32)]``: bit ``t % 32`` of word ``t // 32`` for token ``t``); None: all."""


@dataclass(frozen=True)
class SampledToken:
    """The token chosen for one row, with logprobs when the request asked for them. Also a
    prompt token with its logprob (prompt logprobs), where the token was given, not chosen."""

    token_id: int
    logprob: float | None  # of token_id; None unless params.logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...]  # (token id, logprob), best first
    rank: int | None = None  # 1 + tokens more likely than token_id; prompt tokens only


class SamplingError(ValueError):
    """Rows of a step's logits that no token can be drawn from (no finite logit)."""

    def __init__(self, rows: Sequence[int]) -> None:
        super().__init__(f"rows {list(rows)} have no finite logit to sample from")
        self.rows = tuple(rows)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``; None (use the global RNG) without one."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
    """Pick one token per row of ``logits`` ([num_rows, vocab], fp32 or bf16).

    ``logits`` is not modified. Work is skipped when no row asks for it: an all-greedy batch
    without penalties or bans is a single argmax.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(
            f"logits must be [num_rows, vocab] with num_rows == len(rows) == {len(rows)}, "
            f"got shape {tuple(logits.shape)}"
        )
    if not rows:
        return []
    bans = _min_tokens_bans(rows)
    if not bans and all(_plain_greedy(r) for r in rows):
        best, token_ids = logits.max(dim=-1)  # NaN propagates into the max
        _check_finite(best)
        return _outputs(logits, token_ids, rows)
    processed = _process(logits, rows, bans)  # [num_rows, vocab] fp32
    _check_finite(processed.amax(dim=-1))
    return _outputs(processed, _choose(processed, rows), rows)


def _plain_greedy(row: SamplingRow) -> bool:
    params = row.params
    return (
        params.greedy and not params.has_penalties and not params.logit_bias and row.allowed is None
    )


def _check_finite(row_max: torch.Tensor) -> None:
    """Raise SamplingError for rows whose best logit is -inf or NaN. # row_max: [num_rows]"""
    bad = (~torch.isfinite(row_max)).nonzero().flatten().tolist()
    if bad:
        raise SamplingError(bad)


def _min_tokens_bans(rows: Sequence[SamplingRow]) -> list[tuple[int, list[int]]]:
    """(row index, token ids to ban) for rows still below their min_tokens."""
    bans = []
    for i, row in enumerate(rows):
        params = row.params
        if len(row.output_token_ids) >= params.min_tokens:
            continue
        banned = list(params.stop_token_ids)
        if not params.ignore_eos:
            banned.extend(row.eos_token_ids)
        if banned:
            bans.append((i, banned))
    return bans


def _process(
    logits: torch.Tensor, rows: Sequence[SamplingRow], bans: list[tuple[int, list[int]]]
) -> torch.Tensor:
    """fp32 logits after min_tokens bans, logit bias, penalties and grammar masks; a copy when
    any applies."""
    penalised = [i for i, r in enumerate(rows) if r.params.has_penalties]
    biased = [(i, r.params.bias_pairs) for i, r in enumerate(rows) if r.params.logit_bias]
    masked = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not bans and not penalised and not biased and not masked:
        return logits.float()  # no copy when already fp32
    logits = logits.to(torch.float32, copy=True)
    vocab, device = logits.shape[1], logits.device
    if bans:
        positions = [i * vocab + t for i, ids in bans for t in ids]
        logits.view(-1).index_fill_(0, torch.tensor(positions, device=device), -math.inf)
    if biased:
        positions = [i * vocab + t for i, pairs in biased for t, _ in pairs]
        values = [b for _, pairs in biased for _, b in pairs]
        logits.view(-1).index_add_(
            0, torch.tensor(positions, device=device), torch.tensor(values, device=device)
        )
    if penalised:
        apply_penalties_(
            logits,
            [r.prompt_token_ids for r in rows],
            [r.output_token_ids for r in rows],
            [r.params.repetition_penalty for r in rows],
            [r.params.presence_penalty for r in rows],
            [r.params.frequency_penalty for r in rows],
        )
    if masked:
        packed = torch.stack([rows[i].allowed for i in masked]).to(device)  # type: ignore[misc]
        allowed = unpack_bitmask(packed, vocab)
        index = torch.tensor(masked, device=device)
        logits[index] = logits[index].masked_fill(~allowed, -math.inf)
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's int32 bitmask ``[rows, words]`` -> bool ``[rows, vocab_size]`` (True:
    allowed), in plain torch."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _choose(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Token id per row: argmax for greedy rows, a random draw for the others. # [num_rows]"""
    random_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not random_idx:
        return logits.argmax(dim=-1)
    subset = [rows[i] for i in random_idx]
    sampled = sample_random(
        take_rows(logits, random_idx), [r.params for r in subset], [r.generator for r in subset]
    )
    if len(random_idx) == len(rows):
        return sampled
    return put_rows(logits.argmax(dim=-1), random_idx, sampled)


def _outputs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[SampledToken]:
    """Package the chosen ids, with logprobs for the rows that asked for them."""
    ids: list[int] = token_ids.tolist()
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return [SampledToken(t, None, ()) for t in ids]
    logprobs = torch.log_softmax(take_rows(logits, want).float(), dim=-1)  # [num_want, vocab]
    chosen = logprobs.gather(1, take_rows(token_ids, want)[:, None]).squeeze(1).tolist()
    max_top = max(rows[i].params.logprobs or 0 for i in want)
    top_vals: list[list[float]] = [[] for _ in want]
    top_ids: list[list[int]] = [[] for _ in want]
    if max_top > 0:
        top = logprobs.topk(max_top, dim=-1)
        top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    out = [SampledToken(t, None, ()) for t in ids]
    for j, i in enumerate(want):
        k = rows[i].params.logprobs or 0
        top_pairs = tuple(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
        out[i] = SampledToken(ids[i], chosen[j], top_pairs)
    return out
