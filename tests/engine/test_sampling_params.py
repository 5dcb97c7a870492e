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
        ({"temperature": -0.1}, "temperature must be >= 0 (0 = greedy), got -0.1"),
        ({"temperature": math.nan}, "temperature must be >= 0 (0 = greedy), got nan"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -2}, "top_k must be an integer >= 1, or 0 / -1 to disable, got -2"),
        ({"top_k": 2.5}, "top_k must be an integer >= 1, or 0 / -1 to disable, got 2.5"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 (1 = off), got 0.0"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
        ({"n": 0}, "n must be an integer >= 1, got 0"),
        ({"n": True}, "n must be an integer >= 1, got True"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1 or None, got 0"),
        ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens (4), got 5"),
        ({"logprobs": 21}, "logprobs must be an integer in [0, 20] or None, got 21"),
        ({"logprobs": -1}, "logprobs must be an integer in [0, 20] or None, got -1"),
        ({"stop": ["ok", ""]}, "stop must be a non-empty string, got ''"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids must be non-negative integers, got -1"),
        ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),
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
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


def test_has_penalties() -> None:
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=0.5).has_penalties
    assert SamplingParams(frequency_penalty=-0.5).has_penalties
