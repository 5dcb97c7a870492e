"""SamplingParams: defaults, normalisation and validation messages."""

from __future__ import annotations

import math
from typing import Any

import pytest

from crossinfer.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.greedy and not p.has_penalties


def test_stop_is_normalised_to_a_tuple() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[5, 7]).stop_token_ids == (5, 7)
    # Tuples keep the instance hashable: equal params hash equal.
    assert hash(SamplingParams(stop=["x"])) == hash(SamplingParams(stop=("x",)))


def test_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(AttributeError):
        setattr(p, "temperature", 0.5)  # noqa: B010 -- the attribute is read-only to mypy


@pytest.mark.parametrize(
    ("params", "greedy"),
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=1e-6), True),
        (SamplingParams(temperature=0.7, top_k=1), True),
        (SamplingParams(temperature=0.7), False),
        (SamplingParams(temperature=0.7, top_k=-1), False),
    ],
)
def test_greedy(params: SamplingParams, greedy: bool) -> None:
    assert params.greedy is greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be finite and >= 0, got -0.1"),
        ({"temperature": math.nan}, "temperature must be finite and >= 0, got nan"),
        ({"temperature": math.inf}, "temperature must be finite and >= 0, got inf"),
        ({"temperature": True}, "temperature must be finite and >= 0, got True"),
        ({"temperature": "0.5"}, "temperature must be finite and >= 0, got '0.5'"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": math.nan}, "top_p must be in (0, 1], got nan"),
        ({"top_k": -2}, "top_k must be an integer >= 1, or 0 / -1 to disable, got -2"),
        ({"top_k": 2.5}, "top_k must be an integer >= 1, or 0 / -1 to disable, got 2.5"),
        ({"top_k": 2**31}, "top_k must be an integer >= 1, or 0 / -1 to disable, got 2147483648"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        (
            {"repetition_penalty": 0.0},
            "repetition_penalty must be in [0.01, 100] (1 = off), got 0.0",
        ),
        (
            {"repetition_penalty": 1e-300},
            "repetition_penalty must be in [0.01, 100] (1 = off), got 1e-300",
        ),
        (
            {"repetition_penalty": 101},
            "repetition_penalty must be in [0.01, 100] (1 = off), got 101",
        ),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty must be in [-2, 2], got -inf"),
        ({"n": 0}, "n must be an integer >= 1, got 0"),
        ({"n": True}, "n must be an integer >= 1, got True"),
        ({"max_tokens": -1}, "max_tokens must be an integer >= 0 or None, got -1"),
        ({"max_tokens": 0, "n": 2}, "n must be 1 when max_tokens is 0 (the prompt alone), got 2"),
        ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens (4), got 5"),
        ({"logprobs": -1}, "logprobs must be an integer >= 0 or None, got -1"),
        ({"prompt_logprobs": 1.0}, "prompt_logprobs must be an integer >= 0 or None, got 1.0"),
        ({"stop": ["ok", ""]}, "stop must be a non-empty string, got ''"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids must be non-negative integers, got -1"),
        ({"seed": 1.5}, "seed must be a 64-bit integer (signed or unsigned) or None, got 1.5"),
        (
            {"seed": 2**64},
            "seed must be a 64-bit integer (signed or unsigned) or None, got 18446744073709551616",
        ),
        (
            {"seed": -(2**63) - 1},
            "seed must be a 64-bit integer (signed or unsigned) or None, got -9223372036854775809",
        ),
        ({"logit_bias": {5: 101.0}}, "logit_bias must be in [-100, 100], got 101.0"),
        ({"logit_bias": {5: math.nan}}, "logit_bias must be in [-100, 100], got nan"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias must be keyed by token ids, got -1"),
    ],
)
def test_validation_names_parameter_value_and_range(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0, "repetition_penalty": 0.5},
        {"max_tokens": None, "min_tokens": 100, "logprobs": 0},
        {"max_tokens": 1, "min_tokens": 1, "logprobs": 20, "seed": 0},
        {"max_tokens": 0, "prompt_logprobs": 0, "seed": 2**64 - 1},
        {"seed": -(2**63), "top_k": 2**31 - 1, "repetition_penalty": 0.01},
        {"logit_bias": {0: -100.0, 7: 100}, "temperature": 1e6},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


def test_logit_bias_is_stored_as_sorted_pairs() -> None:
    p = SamplingParams(logit_bias={9: 1.5, 3: -2.0})
    assert p.logit_bias == ((3, -2.0), (9, 1.5))
    assert p == SamplingParams(logit_bias=[(9, 1.5), (3, -2.0)])
    assert p.token_ids_used == (3, 9)
    assert SamplingParams(stop_token_ids=[4], logit_bias={2: 1.0}).token_ids_used == (4, 2)


def test_has_penalties() -> None:
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=0.5).has_penalties
    assert SamplingParams(frequency_penalty=-0.5).has_penalties
