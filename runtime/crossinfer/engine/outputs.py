"""What the engine returns: per-request outputs after each step and at the end."""

from __future__ import annotations

from dataclasses import dataclass

from crossinfer.engine.sampler import SampledToken


@dataclass(frozen=True)
class CompletionOutput:
    """One of a request's ``n`` samples, as of the latest step."""

    index: int
    text: str
    """All text so far (cut at a stop string)."""
    token_ids: tuple[int, ...]
    """All generated token ids so far."""
    delta: str
    """Text added by the latest step (for streaming)."""
    num_new_tokens: int
    """Tokens added by the latest step."""
    logprobs: tuple[SampledToken, ...] | None
    """Per generated token, when the request asked for logprobs."""
    finish_reason: str | None
    """None while running; "stop", "length", "abort" or "error" once finished."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the sample, if any."""


@dataclass(frozen=True)
class RequestMetricsOutput:
    arrival_time: float
    time_to_first_token: float | None
    time_per_output_token: float | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    metrics: RequestMetricsOutput
    prompt_logprobs: tuple[SampledToken | None, ...] | None = None
    """Per prompt token when asked for (``prompt_logprobs``): its logprob, rank and the best
    alternatives; the first token's is None. Complete once the first token is sampled."""
    error: str | None = None
    """Why the request failed inside the engine (a message fit for its client), or None."""


@dataclass(frozen=True)
class SampleDelta:
    """What one sample gained in a step, as the engine core reports it: token ids, not text
    (the output processor turns them into text and applies the stop strings)."""

    index: int
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[SampledToken, ...] | None
    """One per new token, when the request asked for logprobs."""
    finish_reason: str | None
    """None while running; "stop" (by token), "length", "abort" or "error" once finished."""
    stop_token_id: int | None = None
    """The stop token id that ended the sample, if one did."""


@dataclass(frozen=True)
class CoreOutput:
    """One request group's change in a step: small and picklable, so that it can cross from
    an engine-core process to the API server."""

    request_id: str
    samples: tuple[SampleDelta, ...]
    finished: bool
    metrics: RequestMetricsOutput
    prompt_logprobs: tuple[SampledToken | None, ...] | None = None
    """Sent once, with the group's first output (see ``RequestOutput.prompt_logprobs``)."""
    error: str | None = None
