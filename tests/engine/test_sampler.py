"""The batched sampler: greedy, seeds, truncation masks, penalties and logprobs."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from crossinfer.engine import random_sampling
from crossinfer.engine.penalties import apply_penalties_
from crossinfer.engine.sampler import (
    SampledToken,
    SamplingError,
    SamplingRow,
    make_generator,
    sample,
)
from crossinfer.sampling_params import SamplingParams

VOCAB = 1000
# Probabilities chosen so every top-p / min-p boundary falls between two tokens.
PROBS = [0.5, 0.3, 0.15, 0.05]
PROB_LOGITS = torch.tensor(PROBS).log()


def row(
    params: SamplingParams | None = None,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    generator: torch.Generator | None = None,
    eos: Sequence[int] = (),
) -> SamplingRow:
    return SamplingRow(params or SamplingParams(), prompt, output, generator, eos)


def random_logits(num_rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=gen) * 3  # [num_rows, vocab]


def ids(tokens: list[SampledToken]) -> list[int]:
    return [t.token_id for t in tokens]


def draws(params: SamplingParams, logits_row: torch.Tensor, num: int = 2000) -> Counter[int]:
    """Token counts over ``num`` draws from one distribution (one batched call, seeded)."""
    logits = logits_row.expand(num, -1).contiguous()
    with torch.random.fork_rng(devices=[]):  # a fixed seed, leaving the global RNG as it was
        torch.manual_seed(1234)
        return Counter(ids(sample(logits, [row(params)] * num)))


# -- greedy -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_argmax(dtype: torch.dtype) -> None:
    logits = random_logits(8).to(dtype)
    out = sample(logits, [row(SamplingParams(temperature=0.0))] * 8)
    assert ids(out) == logits.argmax(dim=-1).tolist()
    assert all(t.logprob is None and t.top_logprobs == () for t in out)


def test_greedy_rows_in_a_mixed_batch_take_the_argmax() -> None:
    logits = random_logits(4)
    greedy = SamplingParams(temperature=0.0)
    rows = [row(greedy), row(SamplingParams(top_p=0.9)), row(greedy), row(SamplingParams())]
    out = ids(sample(logits, rows))
    argmax = logits.argmax(dim=-1).tolist()
    assert (out[0], out[2]) == (argmax[0], argmax[2])


def test_sample_leaves_its_input_untouched() -> None:
    logits = random_logits(3)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5)
    sample(logits, [row(params, prompt=[1, 2], output=[3])] * 3)
    assert torch.equal(logits, before)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="num_rows == len\\(rows\\) == 2, got shape \\(3, 1000\\)"):
        sample(random_logits(3), [row(), row()])


@pytest.fixture(params=["default", "full-vocab", "small-candidates"])
def candidate_sizes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test through each sampling path: the kept set must not depend on it."""
    sizes = {"default": (256, 4096), "full-vocab": (1,), "small-candidates": (2, 64)}
    monkeypatch.setattr(random_sampling, "_CANDIDATE_SIZES", sizes[request.param])


# -- seeds ------------------------------------------------------------------------------


def run_steps(logits: torch.Tensor, rows: list[SamplingRow], steps: int) -> list[list[int]]:
    """Sample ``steps`` times from fixed logits, appending each token to its row's output."""
    outputs: list[list[int]] = [list(r.output_token_ids) for r in rows]
    history: list[list[int]] = []
    for _ in range(steps):
        current = [
            SamplingRow(r.params, r.prompt_token_ids, out, r.generator)
            for r, out in zip(rows, outputs, strict=True)
        ]
        tokens = ids(sample(logits, current))
        for out, token in zip(outputs, tokens, strict=True):
            out.append(token)
        history.append(tokens)
    return history


# Through the top-candidates path, the full-vocab path, and the fallback from one to the other.
SEEDED_CASES = [
    SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=7, presence_penalty=0.5),
    SamplingParams(temperature=1.0, seed=7, frequency_penalty=0.3),
    SamplingParams(temperature=3.0, top_p=0.99, seed=7),
]


def seeded_alone(params: SamplingParams, steps: int) -> list[int]:
    logits = random_logits(1, seed=42)
    seeded = row(params, prompt=[1, 2, 3], generator=make_generator(7))
    return [step[0] for step in run_steps(logits, [seeded], steps)]


@pytest.mark.parametrize("params", SEEDED_CASES)
def test_seeded_sampling_repeats_exactly(params: SamplingParams) -> None:
    first, second = seeded_alone(params, 20), seeded_alone(params, 20)
    assert first == second
    assert len(set(first)) > 1  # really sampled, not a constant


@pytest.mark.parametrize("position", [0, 2, 4])
@pytest.mark.parametrize("params", SEEDED_CASES)
def test_seeded_sampling_is_independent_of_the_batch(
    params: SamplingParams, position: int, candidate_sizes: None
) -> None:
    others = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(top_p=0.5, min_p=0.1)),
        row(SamplingParams(top_k=3, repetition_penalty=1.3), prompt=[5, 6]),
        row(SamplingParams(seed=99, temperature=1.5), generator=make_generator(99)),
    ]
    ours = row(params, prompt=[1, 2, 3], generator=make_generator(7))
    rows = others[:position] + [ours] + others[position:]
    own_logits = random_logits(1, seed=42)
    logits = torch.cat([random_logits(4, seed=1)[:position], own_logits,
                        random_logits(4, seed=1)[position:]])  # fmt: skip
    history = run_steps(logits, rows, 20)
    assert [step[position] for step in history] == seeded_alone(params, 20)


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(3), make_generator(3)
    assert a is not None and b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# -- truncation -------------------------------------------------------------------------


def test_top_k_only_the_k_best_appear(candidate_sizes: None) -> None:
    logits = random_logits(1)[0]
    best = set(logits.topk(5).indices.tolist())
    assert set(draws(SamplingParams(top_k=5, temperature=2.0), logits)) == best


def test_top_k_1_is_greedy() -> None:
    logits = random_logits(6)
    out = sample(logits, [row(SamplingParams(top_k=1, temperature=5.0))] * 6)
    assert ids(out) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.4, {0}), (0.6, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(
    top_p: float, kept: set[int], candidate_sizes: None
) -> None:
    assert set(draws(SamplingParams(top_p=top_p), PROB_LOGITS)) == kept


def test_top_p_applies_to_the_renormalised_top_k(candidate_sizes: None) -> None:
    # Within the top 2, the probabilities are [0.625, 0.375]: the best alone reaches 0.6.
    assert set(draws(SamplingParams(top_k=2, top_p=0.6), PROB_LOGITS)) == {0}
    assert set(draws(SamplingParams(top_k=3), PROB_LOGITS)) == {0, 1, 2}


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [(0.9, {0}), (0.5, {0, 1}), (0.2, {0, 1, 2}), (0.11, {0, 1, 2}), (0.09, {0, 1, 2, 3})],
)
def test_min_p_drops_tokens_below_min_p_times_max(
    min_p: float, kept: set[int], candidate_sizes: None
) -> None:
    assert set(draws(SamplingParams(min_p=min_p), PROB_LOGITS)) == kept


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_frequencies_follow_the_tempered_distribution(
    temperature: float, candidate_sizes: None
) -> None:
    tempered = torch.tensor(PROBS) ** (1 / temperature)
    expected = (tempered / tempered.sum()).tolist()
    counts = draws(SamplingParams(temperature=temperature), PROB_LOGITS, num=8000)
    for token, p in enumerate(expected):
        assert counts[token] / 8000 == pytest.approx(p, abs=0.02)


def reference_kept(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """The kept set computed the slow, obvious way: sort, then cut by k, p and min-p."""
    order = logits.argsort(descending=True).tolist()
    k = params.top_k if params.top_k > 0 else len(order)
    probs = torch.softmax(logits[order[:k]], dim=-1).tolist()
    kept, mass = [], 0.0
    for token, p in zip(order, probs, strict=False):
        if mass >= params.top_p or p < params.min_p * probs[0]:
            break
        kept.append(token)
        mass += p
    return set(kept)


# A flat distribution over shuffled ids: kept sets of hundreds of tokens.
FLAT_LOGITS = (-0.002 * torch.arange(VOCAB, dtype=torch.float32))[
    torch.randperm(VOCAB, generator=torch.Generator().manual_seed(5))
]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.6),
        SamplingParams(top_k=300),
        SamplingParams(top_k=400, top_p=0.7),
        SamplingParams(top_k=350, top_p=0.9, min_p=0.5),
        SamplingParams(top_k=200, top_p=0.9),
        SamplingParams(top_p=0.9, min_p=0.8),
    ],
)
def test_large_kept_sets_match_the_reference(params: SamplingParams, candidate_sizes: None) -> None:
    kept = reference_kept(FLAT_LOGITS, params)
    ranks = {t: r for r, t in enumerate(FLAT_LOGITS.argsort(descending=True).tolist())}
    seen = set(draws(params, FLAT_LOGITS, num=1000))
    assert seen <= kept
    # Reaches the far end of the kept set: nothing was cut early.
    assert max(ranks[t] for t in seen) >= 0.9 * len(kept)


def test_unseeded_rows_sample_from_the_global_rng() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        counts = Counter(ids(sample(PROB_LOGITS.expand(4000, -1), [row()] * 4000)))
    assert counts[0] / 4000 == pytest.approx(0.5, abs=0.03)
    assert set(counts) == {0, 1, 2, 3}


# -- penalties ----------------------------------------------------------------------------

PEN_LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])


@pytest.mark.parametrize(
    ("repetition", "presence", "frequency", "expected"),
    [
        # prompt [0], output [1, 3, 3]: repetition divides 2.0 and 3.0, multiplies -1.0.
        (2.0, 0.0, 0.0, [1.0, -2.0, 0.5, 1.5, -2.0]),
        # output counts: id 1 once, id 3 twice; prompt id 0 untouched.
        (1.0, 0.5, 0.25, [2.0, -1.75, 0.5, 2.0, -2.0]),
        (2.0, 0.5, 0.25, [1.0, -2.75, 0.5, 0.5, -2.0]),
        (1.0, -1.0, 0.0, [2.0, 0.0, 0.5, 4.0, -2.0]),
    ],
)
def test_penalty_formulas(
    repetition: float, presence: float, frequency: float, expected: list[float]
) -> None:
    logits = PEN_LOGITS.clone()
    apply_penalties_(logits, [[0]], [[1, 3, 3]], [repetition], [presence], [frequency])
    assert logits.tolist() == [expected]


def test_penalties_are_per_row() -> None:
    logits = PEN_LOGITS.repeat(3, 1)
    apply_penalties_(
        logits, [[0], [4], []], [[1], [], [3, 3]], [2.0, 0.5, 1.0], [0.0, 0.0, 1.0], [0, 0, 0.5]
    )
    assert logits.tolist() == [
        [1.0, -2.0, 0.5, 3.0, -2.0],
        [2.0, -1.0, 0.5, 3.0, -1.0],
        [2.0, -1.0, 0.5, 1.0, -2.0],
    ]


def test_sample_applies_penalties_before_greedy() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    rows = [
        row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0]),
        row(SamplingParams(temperature=0.0, frequency_penalty=0.6), output=[0, 0]),
    ]
    assert ids(sample(logits, rows)) == [1, 1]


def test_min_tokens_bans_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 3)
    greedy = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    ignore = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1], ignore_eos=True)
    rows = [row(greedy, output=[3], eos=[0]), row(greedy, output=[3, 3], eos=[0]),
            row(ignore, output=[], eos=[0])]  # fmt: skip
    assert ids(sample(logits, rows)) == [2, 0, 0]


def test_min_tokens_bans_hold_for_sampled_rows(candidate_sizes: None) -> None:
    params = SamplingParams(min_tokens=1, stop_token_ids=[0])
    assert set(draws(params, PROB_LOGITS)) == {1, 2, 3}


# -- logprobs -----------------------------------------------------------------------------


def test_logprobs_are_log_softmax_at_the_sampled_ids() -> None:
    logits = random_logits(4)
    rows = [
        row(SamplingParams(temperature=0.0, logprobs=3)),
        row(SamplingParams(temperature=0.7, top_p=0.9, logprobs=5)),
        row(SamplingParams(logprobs=0)),
        row(SamplingParams()),
    ]
    out = sample(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    for i, k in enumerate([3, 5, 0]):
        tok = out[i]
        assert tok.logprob == pytest.approx(reference[i, tok.token_id].item(), abs=1e-5)
        assert len(tok.top_logprobs) == k
        values = [v for _, v in tok.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in tok.top_logprobs] == reference[i].topk(k).indices.tolist()
    assert out[0].top_logprobs[0][0] == out[0].token_id  # greedy picks the best
    assert out[3].logprob is None and out[3].top_logprobs == ()


def test_logprobs_include_penalties_but_not_temperature() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.3, repetition_penalty=2.0, logprobs=3)
    out = sample(logits, [row(params, prompt=[0])])[0]
    expected = torch.log_softmax(torch.tensor([1.0, 1.0, 0.0]), dim=-1).tolist()
    assert dict(out.top_logprobs) == pytest.approx(dict(enumerate(expected)))


def test_bf16_logprobs_are_computed_in_fp32() -> None:
    logits = random_logits(2).to(torch.bfloat16)
    out = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=1))] * 2)
    reference = torch.log_softmax(logits.float(), dim=-1)
    for i, tok in enumerate(out):
        assert tok.logprob == pytest.approx(reference[i, tok.token_id].item(), abs=1e-5)
        assert not math.isnan(tok.logprob or math.nan)


# -- logit bias ---------------------------------------------------------------------------


def test_logit_bias_is_added_before_greedy_and_logprobs() -> None:
    logits = random_logits(2)
    worst = int(logits[0].argmin())
    biased = SamplingParams(temperature=0, logit_bias={worst: 100.0}, logprobs=0)
    out = sample(logits, [row(biased), row(SamplingParams(temperature=0))])
    assert ids(out) == [worst, int(logits[1].argmax())]
    shifted = logits[0].clone()
    shifted[worst] += 100.0
    assert out[0].logprob == pytest.approx(float(torch.log_softmax(shifted, -1)[worst]), abs=1e-5)


def test_a_negative_logit_bias_bans_a_token_from_sampling() -> None:
    best = int(PROB_LOGITS.argmax())
    params = SamplingParams(temperature=1.0, logit_bias={best: -100.0})
    assert best not in draws(params, PROB_LOGITS)


# -- rows without a finite logit ----------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_without_a_finite_logit_are_named_before_any_draw(temperature: float) -> None:
    logits = random_logits(3)
    logits[1] = math.nan
    params = SamplingParams(temperature=temperature)
    generator = make_generator(7)
    with pytest.raises(SamplingError) as info:
        sample(logits, [row(params), row(params), row(params, generator=generator)])
    assert info.value.rows == (1,)
    # The good seeded row's generator was not advanced: a retry without row 1 is exact.
    assert generator is not None and torch.rand(1, generator=generator).item() == (
        torch.rand(1, generator=torch.Generator().manual_seed(7)).item()
    )


def test_banning_every_token_leaves_no_finite_logit() -> None:
    logits = random_logits(2, vocab=5)
    everything = SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[0, 1, 2, 3, 4])
    with pytest.raises(SamplingError) as info:
        sample(logits, [row(SamplingParams(temperature=0)), row(everything)])
    assert info.value.rows == (1,)
