"""Request and response bodies of the OpenAI-compatible API, as pydantic models: completions,
chat, models and errors; vLLM's tokenize / detokenize.

The request models are the one list of what the server accepts: a field that is not declared
here is refused with a 400 naming it (``extra="forbid"``), never silently ignored;
``UNSUPPORTED`` says why for the well-known ones. Types are strict (no strings or booleans
where numbers belong), floats finite, and every static range is declared, so /openapi.json
documents what is refused. Ranges that depend on the model or the server's flags (token ids,
lengths, --max-n, ...) are checked when the request is built (server/params.py and
server/prompts.py) and written into the served schema (server/openapi.py). A field sent as
``null`` means "the default", as the OpenAI API treats it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WrapValidator,
    model_serializer,
    model_validator,
)

from crossinfer.sampling_params import (
    LOGIT_BIAS_MAX,
    PENALTY_MAX,
    PENALTY_MIN,
    REPETITION_PENALTY_MAX,
    REPETITION_PENALTY_MIN,
    SEED_MAX,
    SEED_MIN,
    TOP_K_MAX,
)
from crossinfer.server.body import Body, finite
from crossinfer.server.structured_protocol import (
    DeltaToolCall,
    ResponseFormat,
    StructuredOutputsField,
    Tool,
    ToolCall,
    ToolChoice,
)

MAX_STOP_CHARS = 1024  # characters in one stop string
MAX_SALT_CHARS = 1024

# Fields clients commonly send that this server does not implement, and why.
UNSUPPORTED: dict[str, str] = {
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "guided_decoding_backend": "structured outputs always run on xgrammar here",
    "guided_whitespace_pattern": "JSON is generated without free whitespace here",
    "suffix": "insertion (suffix) is not supported by this server",
    "allowed_token_ids": "not supported by this server; use logit_bias",
    "audio": "audio output is not supported by this server",
    "modalities": "only text output is supported by this server",
    "prediction": "predicted outputs are not supported by this server",
    "reasoning_effort": "this server serves no reasoning models",
    "store": "this server stores no completions",
    "metadata": "this server stores no completions",
    "service_tier": "this server has one service tier",
    "web_search_options": "web search is not supported by this server",
    "echo": "echo is supported on /v1/completions only",
    "typical_p": "typical sampling is not supported by this server",
    "adapter_id": "TGI's field; the OpenAI routes choose an adapter by `model`",
}


Temperature = Annotated[float, finite(ge=0)]
TopP = Annotated[float, finite(gt=0, le=1)]
TopK = Annotated[int, Field(ge=-1, le=TOP_K_MAX)]
MinP = Annotated[float, finite(ge=0, le=1)]
Penalty = Annotated[float, finite(ge=PENALTY_MIN, le=PENALTY_MAX)]
RepetitionPenalty = Annotated[float, finite(ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
TokenId = Annotated[int, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Bias = Annotated[float, finite(ge=-LOGIT_BIAS_MAX, le=LOGIT_BIAS_MAX)]
LogitBias = Annotated[
    dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")], Bias],
    Field(json_schema_extra={"additionalProperties": False}),
]


class StreamOptions(Body):
    include_usage: bool = False
    """Send a last chunk with ``usage`` (and no choices) before ``[DONE]``."""


class SamplingFields(Body):
    """Fields common to completions and chat (OpenAI names, plus vLLM's extras)."""

    model: str | None = None  # None = the served model
    temperature: Temperature | None = None  # None = 1.0; 0 = greedy
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    n: Count | None = None  # at most --max-n
    stop: StopString | list[StopString] | None = None  # at most --max-stop-sequences
    stop_token_ids: list[TokenId] | None = None  # at most --max-stop-sequences
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None  # token id (as a string) -> bias
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: Annotated[int, Field(ge=0)] | None = None  # vLLM's: at most --max-logprobs
    cache_salt: (
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_SALT_CHARS)] | None
    ) = None
    """vLLM's: requests share prefix-cache blocks only with requests of the same salt."""
    stream: bool = False
    stream_options: StreamOptions | None = None  # only with stream: true
    user: str | None = None  # an end-user id; it changes nothing in the output
    # Structured outputs: at most one of these (server/constraints.py)
    response_format: ResponseFormat | None = None  # OpenAI's
    structured_outputs: StructuredOutputsField | None = None  # vLLM's current form
    guided_json: dict[str, Any] | str | None = None  # vLLM's older fields
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


def _one_prompt_error(value: Any, handler: Any) -> Any:
    # One message for the prompt's union instead of one per alternative.
    try:
        return handler(value)
    except ValueError:
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of token-id "
            "lists, none of them empty"
        ) from None


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
PromptField = Annotated[
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)],
    WrapValidator(_one_prompt_error),
]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: PromptField  # at most --max-client-batch-size prompts
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default; 0: the prompt only
    logprobs: Annotated[int, Field(ge=0)] | None = None  # at most --max-logprobs
    echo: bool = False  # the prompt before the completion (with its logprobs, when asked for)
    best_of: Count | None = None  # accepted only when equal to n


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are supported."""

    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # name, tool_call_id, ... are passed on to the chat template.
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Count | None = None  # None = the rest of the context
    max_completion_tokens: Count | None = None  # wins over max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None  # at most --max-logprobs
    add_generation_prompt: bool = True
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, else "none"
    parallel_tool_calls: bool = True  # False: at most one call per reply


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class PromptTokenLogprob(BaseModel):
    """vLLM's ``prompt_logprobs`` entry for one token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str


# Per prompt token, {token id: entry} for the token itself and the best alternatives; the
# first token's entry is null.
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's extra: the stop string or token that ended it
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked for


class CompletionResponse(BaseModel):
    """A whole completion, or (with ``usage`` None until the last) one streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, when asked for


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends {"role": "assistant", "content": ""} first, then {"content": "..."}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None  # in the first chunk, when asked for


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "crossinfer"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's card)
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server returns: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class TokenizeRequest(Body):
    """POST /tokenize (vLLM): a ``prompt``, or chat ``messages`` rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
