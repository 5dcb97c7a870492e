"""The batched sampler: last-token logits of one engine step -> one token per row.

Order of operations (vLLM / HF semantics):

1. min_tokens: EOS and ``stop_token_ids`` are banned (-inf) while a row is shorter than
   ``params.min_tokens``;
2. penalties (engine/penalties.py): repetition over prompt + output, presence / frequency
   over the output;
3. greedy rows take the argmax; the others are divided by their temperature, truncated by
   top-k, then top-p (renormalised over the top-k survivors), then min-p, and sampled.

Logprobs are the log-softmax of the logits after steps 1-2 and before step 3: they describe
the distribution the request asked for (penalties included), independent of temperature and
truncation, so greedy and sampled requests report comparable numbers.

Sampling is by inverse CDF: one u ~ U[0, 1) per row, and the token where the cumulative
weight passes u * total. A seeded row draws its u from its own generator, and every
decision about a row (which path samples it, see _sample_random) depends on that row alone,
so a seeded request gets the same tokens whatever else is in the batch and at any row index.
(One uniform per row rather than one exponential per token, as in the exponential race,
because drawing vocab-sized noise costs more than the rest of the step on a CPU.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crossinfer.engine.penalties import apply_penalties_
from crossinfer.sampling_params import SamplingParams

# top-p keeps tokens while the probability mass before them is below top_p; the slack stops
# float rounding of the cumulative sum from adding one token at an exact boundary.
_TOP_P_SLACK = 1e-6
# Truncated rows are sampled among their top logits, trying each size in turn: a topk is far
# cheaper than sorting the vocab. Rows whose kept set is larger use the full-vocab path.
_CANDIDATE_SIZES = (256, 4096)


@dataclass(frozen=True)
class SamplingRow:
    """One row of a step's logits: the request's parameters and token history."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far, excluding this step's
    generator: torch.Generator | None  # from make_generator(params.seed); None = global RNG
    eos_token_ids: Sequence[int] = ()  # banned with stop_token_ids until min_tokens is reached


@dataclass(frozen=True)
class SampledToken:
    """The token chosen for one row, with logprobs when the request asked for them."""

    token_id: int
    logprob: float | None  # of token_id; None unless params.logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...]  # (token id, logprob), best first


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
    if not bans and all(r.params.greedy and not r.params.has_penalties for r in rows):
        return _outputs(logits, logits.argmax(dim=-1), rows)
    processed = _process(logits.float(), rows, bans)  # [num_rows, vocab] fp32
    return _outputs(processed, _choose(processed, rows), rows)


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
    """Apply min_tokens bans and penalties, on a copy when either applies."""
    penalised = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not bans and not penalised:
        return logits
    logits = logits.clone()
    if bans:
        vocab = logits.shape[1]
        positions = [i * vocab + t for i, ids in bans for t in ids]
        logits.view(-1).index_fill_(0, torch.tensor(positions, device=logits.device), -math.inf)
    if penalised:
        apply_penalties_(
            logits,
            [r.prompt_token_ids for r in rows],
            [r.output_token_ids for r in rows],
            [r.params.repetition_penalty for r in rows],
            [r.params.presence_penalty for r in rows],
            [r.params.frequency_penalty for r in rows],
        )
    return logits


def _choose(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Token id per row: argmax for greedy rows, a random draw for the others. # [num_rows]"""
    random_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not random_idx:
        return logits.argmax(dim=-1)
    if len(random_idx) == len(rows):
        return _sample_random(logits, rows)
    token_ids = logits.argmax(dim=-1)
    sampled = _sample_random(_take(logits, random_idx), [rows[i] for i in random_idx])
    return _put(token_ids, random_idx, sampled)


def _sample_random(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature, truncation and an inverse-CDF draw for each row. # [num_rows]

    A row whose kept set (top-k / top-p / min-p) lies within its top candidates is sampled
    among those: a topk and work on [rows, candidates] tensors. The others (no truncation,
    or a kept set too large) are sampled over the whole vocab. Whether a row's kept set fits
    depends only on that row, never on the batch.
    """
    params = [r.params for r in rows]
    vocab, device = logits.shape[1], logits.device
    temps = torch.tensor([p.temperature for p in params], device=device)[:, None]  # [n, 1]
    uniforms = _uniforms(rows, device)  # [n]
    token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
    pending = [i for i, p in enumerate(params) if _truncates(p, vocab)]
    full = [i for i, p in enumerate(params) if not _truncates(p, vocab)]
    for size in _CANDIDATE_SIZES:
        if not pending:
            break
        picked, resolved = _sample_candidates(
            _take(logits, pending),
            [params[i] for i in pending],
            _take(temps, pending),
            _take(uniforms, pending),
            min(size, vocab),
        )
        _put(token_ids, pending, picked)
        pending = [i for i, ok in zip(pending, resolved, strict=True) if not ok]
    full += pending
    if full:
        picked = _sample_full(
            _take(logits, full),
            [params[i] for i in full],
            _take(temps, full),
            _take(uniforms, full),
        )
        _put(token_ids, full, picked)
    return token_ids


# Rows are gathered and scattered with index_select / index_copy_: on CPU, advanced indexing
# (tensor[list]) can cost milliseconds when the thread pool is contended.
def _take(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows], without a copy when ``rows`` is every row in order."""
    if rows == list(range(tensor.shape[0])):
        return tensor
    return tensor.index_select(0, torch.tensor(rows, device=tensor.device))


def _put(tensor: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """tensor[rows] = values, in place; returns ``tensor``."""
    return tensor.index_copy_(0, torch.tensor(rows, device=tensor.device), values)


def _truncates(params: SamplingParams, vocab: int) -> bool:
    return params.top_p < 1.0 or 0 < params.top_k < vocab or params.min_p > 0.0


def _uniforms(rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per row, seeded rows from their own generator. # [num_rows]"""
    seeded = [(i, r.generator) for i, r in enumerate(rows) if r.generator is not None]
    if not seeded:
        return torch.rand(len(rows), device=device)
    draws = torch.cat([torch.rand(1, generator=g, device=g.device).to(device) for _, g in seeded])
    if len(seeded) == len(rows):
        return draws
    return _put(torch.rand(len(rows), device=device), [i for i, _ in seeded], draws)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised ``weights`` [n, m]. # [n]"""
    cdf = weights.cumsum(dim=-1)  # [n, m]
    total = cdf[:, -1:]
    # Strictly below the total, so the index is valid and its weight is > 0.
    below_total = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(uniforms[:, None] * total, below_total)
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _sample_candidates(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    temps: torch.Tensor,
    uniforms: torch.Tensor,
    size: int,
) -> tuple[torch.Tensor, list[bool]]:
    """Sample among each row's ``size`` best tokens: (token ids [n], resolved per row).

    A row is resolved when its kept set provably lies within the candidates; the token id of
    an unresolved row is meaningless.
    """
    vocab, device = logits.shape[1], logits.device
    values, ids = logits.topk(size, dim=-1)  # [n, size], descending
    values = values / temps  # temperature is monotonic: scale the candidates only
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    keep = torch.arange(size, device=device) < torch.tensor(ks, device=device)[:, None]
    resolved = [k <= size for k in ks]
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        threshold = values[:, :1] + torch.log(min_p)[:, None]  # p / p_max >= min_p
        keep &= values >= threshold
        cut = (values[:, -1] < threshold[:, 0]).tolist()
        resolved = [r or c for r, c in zip(resolved, cut, strict=True)]
    if any(p.top_p < 1.0 for p in params):
        in_top_p = _top_p_mask(logits, values, keep, temps, params)
        keep &= in_top_p
        cut = (~in_top_p[:, -1]).tolist()
        for i, (p, k) in enumerate(zip(params, ks, strict=True)):
            if p.top_p < 1.0:
                # A nucleus within a top-k wider than the candidates needs that top-k's mass.
                resolved[i] = (resolved[i] or cut[i]) and not size < k < vocab
    keep[:, 0] = True  # the best token always survives
    weights = torch.exp(values - values[:, :1]) * keep  # [n, size]
    picked = ids.gather(1, _inverse_cdf(weights, uniforms)[:, None]).squeeze(1)
    return picked, resolved


def _top_p_mask(
    logits: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    temps: torch.Tensor,
    params: Sequence[SamplingParams],
) -> torch.Tensor:
    """Candidates inside the nucleus: the mass before them is below top_p. # [n, size]"""
    size, device = values.shape[1], values.device
    kept_values = values.masked_fill(~keep, -math.inf)
    # The nucleus is taken within the top-k survivors (HF / vLLM order): their mass is that
    # of the kept candidates when top-k fits in them, else that of the whole vocab.
    log_total = kept_values.logsumexp(dim=-1)  # [n]
    wide = [i for i, p in enumerate(params) if p.top_p < 1.0 and not 0 < p.top_k <= size]
    if wide:
        _put(log_total, wide, (_take(logits, wide) / _take(temps, wide)).logsumexp(dim=-1))
    probs = torch.exp(kept_values - log_total[:, None])
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows without top-p keep every candidate, whatever the rounding of their mass.
    limits = [p.top_p - _TOP_P_SLACK if p.top_p < 1.0 else math.inf for p in params]
    return mass_before < torch.tensor(limits, device=device)[:, None]


def _sample_full(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    temps: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Sample over the whole vocab, after truncation when a row asks for it. # [n]"""
    vocab = logits.shape[1]
    scaled = logits / temps  # [n, vocab]
    max_scaled = scaled.max(dim=-1, keepdim=True).values  # [n, 1]
    weights = torch.sub(scaled, max_scaled).exp_()  # [n, vocab]
    if any(_truncates(p, vocab) for p in params):
        # min-p: p / p_max >= min_p  <=>  logit >= max + log(min_p); log(0) = -inf keeps all.
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        cutoff = max_scaled + torch.log(min_p)[:, None]  # [n, 1]; a token needs >= cutoff
        if any(p.top_p < 1.0 or 0 < p.top_k < vocab for p in params):
            cutoff = torch.maximum(cutoff, _top_k_top_p_cutoff(scaled, params))
        weights.masked_fill_(scaled < cutoff, 0.0)
    return _inverse_cdf(weights, uniforms)


def _top_k_top_p_cutoff(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Logit of the last token of each row's top-p set within its top-k. # [n, 1]"""
    vocab, device = logits.shape[1], logits.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    ordered = logits.sort(dim=-1, descending=True).values  # [n, vocab]
    ordered = ordered.masked_fill(torch.arange(vocab, device=device) >= top_k[:, None], -math.inf)
    probs = ordered.softmax(dim=-1)  # renormalised over the top-k survivors
    mass_before = probs.cumsum(dim=-1) - probs
    num_kept = (mass_before < (top_p - _TOP_P_SLACK)[:, None]).sum(dim=-1)
    # The best token is always kept; rows without top-p keep their whole top-k.
    num_kept = torch.where(top_p >= 1.0, top_k, torch.minimum(num_kept.clamp(min=1), top_k))
    return ordered.gather(1, (num_kept - 1)[:, None])


def _outputs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[SampledToken]:
    """Package the chosen ids, with logprobs for the rows that asked for them."""
    ids: list[int] = token_ids.tolist()
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return [SampledToken(t, None, ()) for t in ids]
    logprobs = torch.log_softmax(_take(logits, want).float(), dim=-1)  # [num_want, vocab]
    chosen = logprobs.gather(1, _take(token_ids, want)[:, None]).squeeze(1).tolist()
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
