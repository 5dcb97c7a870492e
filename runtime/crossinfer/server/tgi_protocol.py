"""Request and response bodies of Text Generation Inference's /generate and /generate_stream.

As in protocol.py the request models are the list of what is accepted (unknown fields are
refused by name), with TGI's own ranges: temperature > 0, top_p in (0, 1), top_k >= 1, an
unsigned 64-bit seed. Limits from the server's flags (max_new_tokens against
--max-total-tokens, --max-best-of, --max-stop-sequences, top_n_tokens against
--max-logprobs) are checked when the request is built.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from crossinfer.sampling_params import (
    REPETITION_PENALTY_MAX,
    REPETITION_PENALTY_MIN,
    SEED_MAX,
    TOP_K_MAX,
)
from crossinfer.server.protocol import Body, Count, Penalty, StopString, finite
from crossinfer.server.structured_protocol import TGIGrammar

_FALSE: dict[str, Any] = {"const": False}


def _not_supported(value: bool) -> bool:
    if value:
        raise ValueError("watermarking is not supported by this server")
    return value


class TGIParameters(Body):
    """TGI's ``parameters``; sampling is on when ``do_sample`` or any sampling knob is set."""

    max_new_tokens: Count | None = 100
    do_sample: bool = False
    temperature: Annotated[float, finite(gt=0)] | None = None
    top_p: Annotated[float, finite(gt=0, lt=1)] | None = None
    top_k: Annotated[int, Field(ge=1, le=TOP_K_MAX)] | None = None
    repetition_penalty: (
        Annotated[float, finite(ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX)] | None
    ) = None
    frequency_penalty: Penalty | None = None
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    stop: list[StopString] = Field(default_factory=list)
    truncate: Count | None = None  # keep only the last `truncate` input tokens
    top_n_tokens: Annotated[int, Field(ge=0)] | None = None  # alternatives for each token
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None  # no best-of ranking: 1 only
    watermark: Annotated[bool, AfterValidator(_not_supported), Field(json_schema_extra=_FALSE)] = (
        False  # watermarking is not supported
    )
    details: bool = False
    decoder_input_details: bool = False  # the prompt tokens with their logprobs
    return_full_text: bool = False
    grammar: TGIGrammar | None = None  # the output matches a JSON schema or a regex
    adapter_id: Annotated[str, Field(min_length=1)] | None = None  # a LoRA adapter's name


class TGIGenerateRequest(Body):
    """POST /generate and /generate_stream."""

    inputs: Annotated[str, Field(min_length=1)]
    parameters: TGIParameters = Field(default_factory=TGIParameters)


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class TGIPrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None  # null for the first token


class TGIDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    prefill: list[TGIPrefillToken] = Field(default_factory=list)  # decoder_input_details
    tokens: list[TGIToken] = Field(default_factory=list)  # empty in a stream's last event
    top_tokens: list[list[TGIToken]] | None = None  # top_n_tokens, per generated token


class TGIGenerateResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class TGIStreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None


class TGIStreamResponse(BaseModel):
    """One event of /generate_stream: one token; the last one also carries the whole text."""

    index: int
    token: TGIToken
    top_tokens: list[TGIToken] = Field(default_factory=list)
    generated_text: str | None = None
    details: TGIStreamDetails | None = None


class TGIErrorResponse(BaseModel):
    """TGI's error body: ``{"error": message, "error_type": kind}``."""

    error: str
    error_type: str
