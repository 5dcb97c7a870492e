"""Per-request sampling parameters, validated once when a request arrives."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crossinfer.structured_outputs import StructuredOutputsParams

# Below this temperature, sampling is argmax: dividing logits by ~0 overflows to inf/nan.
GREEDY_TEMPERATURE_EPS = 1e-5
# Ranges shared with the HTTP schema (server/protocol.py), so both refuse the same values.
# What torch's generators take: int64 (the OpenAI API, vLLM) and uint64 (TGI) seeds alike.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
TOP_K_MAX = 2**31 - 1  # any value >= the vocabulary size keeps every token
# Dividing a logit by a penalty below this (or multiplying by one above) can overflow fp32.
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0
PENALTY_MIN, PENALTY_MAX = -2.0, 2.0  # presence and frequency, as OpenAI defines them
LOGIT_BIAS_MAX = 100.0  # |bias|, as OpenAI defines it


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `n=True` is a client bug, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_in(value: object, low: float, high: float) -> bool:
    # Written as `low <= x <= high` so that NaN fails too; infinities fail on the bounds.
    return _is_number(value) and low <= value <= high  # type: ignore[operator]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next tokens of one request, and when to stop (OpenAI / vLLM semantics).

    Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the
    parameter, the value and the allowed range (the HTTP server turns it into a 400). Checks
    that need the model (token ids within the vocabulary, lengths within the context) are the
    engine's, when the request is added. ``stop`` accepts one string or any sequence of
    strings, ``stop_token_ids`` any sequence of ints, ``logit_bias`` a mapping or pairs; all
    are stored as tuples, so instances stay hashable and immutable.
    """

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set with probability >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob
    repetition_penalty: float = 1.0  # HF style, over prompt + output tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0  # OpenAI style, over output tokens
    seed: int | None = None  # per-request RNG seed; None = the engine's global RNG
    max_tokens: int | None = 16  # None = until EOS or the context is full; 0 = the prompt only
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens exist
    stop: Sequence[str] = ()  # stop strings; stored as tuple[str, ...]
    stop_token_ids: Sequence[int] = ()  # stored as tuple[int, ...]
    ignore_eos: bool = False  # keep generating after EOS
    logprobs: int | None = None  # None = no logprobs; k = sampled token's + k best
    prompt_logprobs: int | None = None  # None = none; k = each prompt token's + k best
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = ()
    """Added to the logits of the given token ids before sampling (OpenAI's logit_bias);
    stored as sorted ``(token id, bias)`` pairs."""
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # when detokenising the output
    structured_outputs: StructuredOutputsParams | None = None
    """What the output must match (a JSON schema, a regex, a choice, a grammar); the engine
    masks every token that would break it."""

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        # Frozen dataclass: normalising needs object.__setattr__.
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs)))
        self._validate_sampling()
        self._validate_lengths()
        self._validate_tokens()
        so = self.structured_outputs
        _check(
            so is None or isinstance(so, StructuredOutputsParams),
            "structured_outputs",
            so,
            "a StructuredOutputsParams or None",
        )

    def _validate_sampling(self) -> None:
        t, p, k, m = self.temperature, self.top_p, self.top_k, self.min_p
        _check(_finite_in(t, 0, math.inf) and t != math.inf, "temperature", t, "finite and >= 0")
        _check(_finite_in(p, 0, 1) and p > 0, "top_p", p, "in (0, 1]")
        _check(
            _is_int(k) and -1 <= k <= TOP_K_MAX, "top_k", k, "an integer >= 1, or 0 / -1 to disable"
        )
        _check(_finite_in(m, 0, 1), "min_p", m, "in [0, 1]")
        r = self.repetition_penalty
        low, high = REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX
        _check(_finite_in(r, low, high), "repetition_penalty", r, f"in [{low}, {high:g}] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite_in(value, PENALTY_MIN, PENALTY_MAX), name, value, "in [-2, 2]")
        if self.seed is not None:
            s = self.seed
            _check(
                _is_int(s) and SEED_MIN <= s <= SEED_MAX,
                "seed",
                s,
                "a 64-bit integer (signed or unsigned) or None",
            )

    def _validate_lengths(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        mt = self.max_tokens
        _check(mt is None or (_is_int(mt) and mt >= 0), "max_tokens", mt, "an integer >= 0 or None")
        if mt == 0:
            _check(self.n == 1, "n", self.n, "1 when max_tokens is 0 (the prompt alone)")
        mn = self.min_tokens
        _check(_is_int(mn) and mn >= 0, "min_tokens", mn, "an integer >= 0")
        if mt is not None:
            _check(mn <= mt, "min_tokens", mn, f"<= max_tokens ({mt})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            ok = value is None or (_is_int(value) and value >= 0)
            _check(ok, name, value, "an integer >= 0 or None")

    def _validate_tokens(self) -> None:
        for s in self.stop:
            _check(isinstance(s, str) and s != "", "stop", s, "a non-empty string")
        for i in self.stop_token_ids:
            _check(_is_int(i) and i >= 0, "stop_token_ids", i, "non-negative integers")
        for token_id, bias in self.bias_pairs:
            _check(
                _is_int(token_id) and token_id >= 0, "logit_bias", token_id, "keyed by token ids"
            )
            limit = LOGIT_BIAS_MAX
            _check(
                _finite_in(bias, -limit, limit), "logit_bias", bias, f"in [-{limit:g}, {limit:g}]"
            )

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax: temperature ~0, or top_k == 1."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any repetition, presence or frequency penalty is active."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as stored: sorted ``(token id, bias)`` pairs."""
        return self.logit_bias  # type: ignore[return-value]  # normalised in __post_init__

    @property
    def token_ids_used(self) -> tuple[int, ...]:
        """Every token id the parameters name (stop tokens, biased tokens): the engine checks
        them against the vocabulary."""
        return tuple(self.stop_token_ids) + tuple(t for t, _ in self.bias_pairs)
