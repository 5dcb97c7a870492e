"""Random draws for non-greedy rows: temperature, top-k, top-p, min-p, then one token.

Truncation follows HF / vLLM: top-k, then top-p over the renormalised top-k survivors, then
min-p (keep tokens with p >= min_p * p_max). A token is drawn by inverse CDF: one
u ~ U[0, 1) per row, and the token where the cumulative weight passes u * total. One uniform
per row, rather than vocab-sized noise as in the exponential race, because drawing that
noise costs more than the rest of the step on a CPU.

A row whose kept set lies within its best few hundred tokens is sampled among those: a topk
and work on [rows, candidates] tensors instead of a sort of the vocab. Other rows (no
truncation, or a flat distribution) are sampled over the whole vocab. Which path a row takes
depends only on that row's logits and parameters, and a seeded row draws its uniform from
its own generator, so a seeded request gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from crossinfer.sampling_params import SamplingParams

# Candidate counts tried in turn for truncated rows; rows whose kept set is larger than the
# last use the full-vocab path.
_CANDIDATE_SIZES = (256, 4096)
# top-p keeps tokens while the probability mass before them is below top_p; the slack stops
# float rounding of the cumulative sum from adding one token at an exact boundary.
_TOP_P_SLACK = 1e-6


def sample_random(
    logits: torch.Tensor,  # [n, vocab] fp32, after penalties
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],  # None = the global RNG
) -> torch.Tensor:
    """One token id per row, drawn from its tempered, truncated distribution. # [n]"""
    vocab, device = logits.shape[1], logits.device
    inv_temps = 1.0 / torch.tensor([p.temperature for p in params], device=device)[:, None]
    uniforms = _uniforms(generators, device)  # [n]
    # The nucleus of a top-p row without top-k is relative to the whole vocab's mass.
    log_mass = torch.full((len(params),), math.nan, device=device)  # [n]
    whole = [i for i, p in enumerate(params) if p.top_p < 1.0 and not 0 < p.top_k < vocab]
    if whole:
        mass = torch.logsumexp(take_rows(logits, whole) * take_rows(inv_temps, whole), dim=-1)
        put_rows(log_mass, whole, mass)
    token_ids = torch.empty(len(params), dtype=torch.long, device=device)
    pending = [i for i, p in enumerate(params) if _truncates(p, vocab)]
    full = [i for i, p in enumerate(params) if not _truncates(p, vocab)]
    for size in _CANDIDATE_SIZES:
        if not pending:
            break
        picked, resolved = _sample_candidates(
            take_rows(logits, pending),
            [params[i] for i in pending],
            take_rows(inv_temps, pending),
            take_rows(log_mass, pending),
            take_rows(uniforms, pending),
            min(size, vocab),
        )
        put_rows(token_ids, pending, picked)
        pending = [i for i, ok in zip(pending, resolved, strict=True) if not ok]
    full += pending
    if full:
        sub = [params[i] for i in full]
        picked = _sample_full(
            take_rows(logits, full), sub, take_rows(inv_temps, full), take_rows(uniforms, full)
        )
        put_rows(token_ids, full, picked)
    return token_ids


# Rows are gathered and scattered with index_select / index_copy_: on CPU, advanced indexing
# (tensor[list]) can cost milliseconds when the thread pool is contended.
def take_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows], without a copy when ``rows`` is every row in order."""
    if rows == list(range(tensor.shape[0])):
        return tensor
    return tensor.index_select(0, torch.tensor(rows, device=tensor.device))


def put_rows(tensor: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """tensor[rows] = values, in place; returns ``tensor``."""
    return tensor.index_copy_(0, torch.tensor(rows, device=tensor.device), values)


def _truncates(params: SamplingParams, vocab: int) -> bool:
    return params.top_p < 1.0 or 0 < params.top_k < vocab or params.min_p > 0.0


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per row, seeded rows from their own generator. # [n]"""
    seeded = [(i, g) for i, g in enumerate(generators) if g is not None]
    if not seeded:
        return torch.rand(len(generators), device=device)
    draws = torch.cat([torch.rand(1, generator=g, device=g.device).to(device) for _, g in seeded])
    if len(seeded) == len(generators):
        return draws
    return put_rows(torch.rand(len(generators), device=device), [i for i, _ in seeded], draws)


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
    inv_temps: torch.Tensor,  # [n, 1]
    log_mass: torch.Tensor,  # [n], log of the whole vocab's tempered mass (top-p rows)
    uniforms: torch.Tensor,  # [n]
    size: int,
) -> tuple[torch.Tensor, list[bool]]:
    """Sample among each row's ``size`` best tokens: (token ids [n], resolved per row).

    A row is resolved when its kept set provably lies within the candidates; the token id of
    an unresolved row is meaningless.
    """
    vocab, device = logits.shape[1], logits.device
    values, ids = logits.topk(size, dim=-1)  # [n, size], descending
    values = values * inv_temps  # temperature is monotonic: scale the candidates only
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    keep = torch.arange(size, device=device) < torch.tensor(ks, device=device)[:, None]
    # With the whole vocab as candidates, every kept set lies within them.
    resolved = [k <= size or size == vocab for k in ks]
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        threshold = values[:, :1] + torch.log(min_p)[:, None]  # p / p_max >= min_p
        keep &= values >= threshold
        cut = (values[:, -1] < threshold[:, 0]).tolist()
        resolved = [r or c for r, c in zip(resolved, cut, strict=True)]
    if any(p.top_p < 1.0 for p in params):
        in_top_p = _top_p_mask(values, keep, log_mass, params, vocab)
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
    values: torch.Tensor,
    keep: torch.Tensor,
    log_mass: torch.Tensor,
    params: Sequence[SamplingParams],
    vocab: int,
) -> torch.Tensor:
    """Candidates inside the nucleus: the mass before them is below top_p. # [n, size]"""
    kept_values = values.masked_fill(~keep, -math.inf)
    # The nucleus is taken within the top-k survivors: their mass is that of the kept
    # candidates when top-k applies, else that of the whole vocab.
    whole = torch.tensor([not 0 < p.top_k < vocab for p in params], device=values.device)
    log_total = torch.where(whole, log_mass, kept_values.logsumexp(dim=-1))  # [n]
    probs = torch.exp(kept_values - log_total[:, None])
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows without top-p keep every candidate, whatever the rounding of their mass.
    limits = [p.top_p - _TOP_P_SLACK if p.top_p < 1.0 else math.inf for p in params]
    return mass_before < torch.tensor(limits, device=values.device)[:, None]


def _sample_full(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    inv_temps: torch.Tensor,  # [n, 1]
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """Sample over the whole vocab, after truncation when a row asks for it. # [n]"""
    vocab = logits.shape[1]
    max_logits = logits.amax(dim=-1, keepdim=True)  # [n, 1]
    # p / p_max = exp((logit - max) / T), in one pass plus the exp.
    weights = torch.addcmul(-max_logits * inv_temps, logits, inv_temps).exp_()  # [n, vocab]
    if any(_truncates(p, vocab) for p in params):
        threshold = torch.tensor([p.min_p for p in params], device=logits.device)[:, None]
        if any(p.top_p < 1.0 or 0 < p.top_k < vocab for p in params):
            threshold = torch.maximum(threshold, _top_k_top_p_threshold(weights, params))
        weights.masked_fill_(weights < threshold, 0.0)
    return _inverse_cdf(weights, uniforms)


def _top_k_top_p_threshold(weights: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Weight of the last token of each row's top-p set within its top-k. # [n, 1]"""
    vocab, device = weights.shape[1], weights.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    ordered = weights.sort(dim=-1, descending=True).values  # [n, vocab]
    ordered.masked_fill_(torch.arange(vocab, device=device) >= top_k[:, None], 0.0)
    probs = ordered / ordered.sum(dim=-1, keepdim=True)  # renormalised over the top-k
    mass_before = probs.cumsum(dim=-1) - probs
    num_kept = (mass_before < (top_p - _TOP_P_SLACK)[:, None]).sum(dim=-1)
    # The best token is always kept; rows without top-p keep their whole top-k.
    num_kept = torch.where(top_p >= 1.0, top_k, torch.minimum(num_kept.clamp(min=1), top_k))
    return ordered.gather(1, (num_kept - 1)[:, None])
