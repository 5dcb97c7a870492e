"""Per-request sampling parameters, validated once when a request arrives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Below this temperature, sampling is argmax: dividing logits by ~0 overflows to inf/nan.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `n=True` is a client bug, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next tokens of one request, and when to stop (OpenAI / vLLM semantics).

    Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the
    parameter, the value and the allowed range (the HTTP server turns it into a 400).
    ``stop`` accepts one string or any sequence of strings, ``stop_token_ids`` any sequence of
    ints; both are stored as tuples, so instances stay hashable and immutable.
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
    max_tokens: int | None = 16  # None = until EOS or the context is full
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens exist
    stop: Sequence[str] = ()  # stop strings; stored as tuple[str, ...]
    stop_token_ids: Sequence[int] = ()  # stored as tuple[int, ...]
    ignore_eos: bool = False  # keep generating after EOS
    logprobs: int | None = None  # None = no logprobs; k = sampled token's + k best
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # when detokenising the output

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        # Frozen dataclass: normalising needs object.__setattr__.
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate_sampling()
        self._validate_lengths()

    def _validate_sampling(self) -> None:
        # Written as `not (lo <= x <= hi)` so that NaN fails too.
        t, p, k, m = self.temperature, self.top_p, self.top_k, self.min_p
        _check(t >= 0, "temperature", t, ">= 0 (0 = greedy)")
        _check(0 < p <= 1, "top_p", p, "in (0, 1]")
        _check(_is_int(k) and k >= -1, "top_k", k, "an integer >= 1, or 0 / -1 to disable")
        _check(0 <= m <= 1, "min_p", m, "in [0, 1]")
        r = self.repetition_penalty
        _check(r > 0, "repetition_penalty", r, "> 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, name, value, "in [-2, 2]")
        if self.seed is not None:
            _check(_is_int(self.seed), "seed", self.seed, "an integer or None")

    def _validate_lengths(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        mt = self.max_tokens
        _check(mt is None or (_is_int(mt) and mt >= 1), "max_tokens", mt, "an integer >= 1 or None")
        mn = self.min_tokens
        _check(_is_int(mn) and mn >= 0, "min_tokens", mn, "an integer >= 0")
        if mt is not None:
            _check(mn <= mt, "min_tokens", mn, f"<= max_tokens ({mt})")
        lp = self.logprobs
        ok = lp is None or (_is_int(lp) and 0 <= lp <= MAX_LOGPROBS)
        _check(ok, "logprobs", lp, f"an integer in [0, {MAX_LOGPROBS}] or None")
        for s in self.stop:
            _check(isinstance(s, str) and s != "", "stop", s, "a non-empty string")
        for i in self.stop_token_ids:
            _check(_is_int(i) and i >= 0, "stop_token_ids", i, "non-negative integers")

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
