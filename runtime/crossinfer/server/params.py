"""Request bodies -> SamplingParams and prompts. Only types are checked here; SamplingParams
checks the ranges and its ValueError becomes a 400 naming the parameter."""

from __future__ import annotations

from typing import Any

from crossinfer.engine.async_engine import Prompt
from crossinfer.sampling_params import SamplingParams
from crossinfer.server.errors import APIError, bad_request
from crossinfer.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
    TGIParameters,
)


def _unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def _common(body: SamplingFields) -> dict[str, Any]:
    if body.logit_bias:
        raise _unsupported("logit_bias", "not supported by this server")
    n = 1 if body.n is None else body.n
    if body.best_of is not None and body.best_of != n:
        raise _unsupported("best_of", f"must equal n ({n}); best-of ranking is not supported")
    fields = {
        "n": n,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "seed": body.seed,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens,
    }
    return {k: v for k, v in fields.items() if v is not None}  # null = SamplingParams' default


def _build(fields: dict[str, Any], names: dict[str, str] | None = None) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise bad_request(exc, names) from exc


def completion_params(body: CompletionRequest) -> SamplingParams:
    """The sampling parameters of a /v1/completions request."""
    if body.suffix:
        raise _unsupported("suffix", "not supported by this server")
    if body.echo and body.logprobs is not None:
        # The engine computes no prompt logprobs, which echo with logprobs would need.
        raise _unsupported("echo", "echo together with logprobs is not supported")
    fields = _common(body)
    fields["max_tokens"] = body.max_tokens
    fields["logprobs"] = body.logprobs
    return _build(fields)


def completion_prompts(body: CompletionRequest) -> list[Prompt]:
    """One prompt (text or token ids) per engine request."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]  # list[int], checked above
    return list(prompt)  # type: ignore[arg-type]  # list[str] or list[list[int]]


def chat_params(body: ChatCompletionRequest) -> SamplingParams:
    """The sampling parameters of a /v1/chat/completions request."""
    if body.tools:
        raise _unsupported("tools", "tool calling is not supported by this server")
    fields = _common(body)
    max_tokens = body.max_tokens
    if body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    fields["max_tokens"] = max_tokens  # None: the rest of the context
    if body.logprobs:
        fields["logprobs"] = body.top_logprobs or 0
    elif body.top_logprobs:
        raise _unsupported("top_logprobs", "needs logprobs: true")
    names = {"logprobs": "top_logprobs"}
    if body.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    return _build(fields, names)


def render_chat(
    tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool
) -> list[int]:
    """Token ids of a conversation through the model's chat template (as ``LLM.chat`` does)."""
    conversation = [_message_dict(m, i) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2 raises its own errors for conversations it refuses
        raise APIError(
            400,
            f"messages: the chat template failed: {exc}",
            param="messages",
            code="invalid_value",
        ) from exc
    return list(tokenizer.encode(text, add_special_tokens=False))


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise _unsupported(
                    f"messages[{index}].content", f"content parts of type {part.type!r}"
                )
            texts.append(part.text)
        content = "".join(texts)
    extra = message.model_extra or {}
    role = "system" if message.role == "developer" else message.role  # OpenAI's newer name
    return {**extra, "role": role, "content": content or ""}


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def tgi_params(parameters: TGIParameters) -> SamplingParams:
    """TGI semantics: greedy unless ``do_sample`` or a sampling knob is set; every token
    carries its logprob (TGI's token events always do)."""
    sampling = parameters.do_sample or any(
        v is not None for v in (parameters.temperature, parameters.top_p, parameters.top_k)
    )
    fields: dict[str, Any] = {
        "temperature": _or(parameters.temperature, 1.0) if sampling else 0.0,
        "top_p": parameters.top_p,
        "top_k": parameters.top_k,
        "repetition_penalty": parameters.repetition_penalty,
        "seed": parameters.seed,
        "stop": parameters.stop,
        "max_tokens": parameters.max_new_tokens,
        "logprobs": 0,
    }
    names = {"max_tokens": "parameters.max_new_tokens", "*": "inputs"}
    names |= {k: f"parameters.{k}" for k in fields if k != "max_tokens"}
    return _build({k: v for k, v in fields.items() if v is not None}, names)
