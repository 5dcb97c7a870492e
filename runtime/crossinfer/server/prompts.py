"""Prompts -> token ids, off the event loop and off the engine thread, and their checks.

Tokenising a long prompt or rendering a chat template takes time (a 1 MiB prompt about a
second); on the event loop it would stall every stream, on the engine thread every step. So
it runs on a worker thread of its own (one: Hugging Face tokenizers are not safe to share
between concurrent callers). Then each prompt is checked against the vocabulary and the
server's token limits (--max-input-tokens, --max-total-tokens), and its max_tokens is fixed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import jinja2

from crossinfer.engine.async_engine import GenerateRequest
from crossinfer.lora.request import LoRARequest
from crossinfer.sampling_params import SamplingParams
from crossinfer.server.errors import APIError
from crossinfer.server.limits import ServerLimits
from crossinfer.server.protocol import ChatMessage
from crossinfer.server.tools import TOOL_CALL_END, TOOL_CALL_START, tools_system_prompt

logger = logging.getLogger("crossinfer.server")

T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """One prompt, tokenised."""

    token_ids: list[int]
    text: str | None  # None when it was sent as token ids


@dataclass(frozen=True)
class Names:
    """The API's names for the fields a prompt check may blame."""

    prompt: str = "prompt"
    max_tokens: str = "max_tokens"


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


class PromptService:
    """Tokenises and templates prompts on one worker thread; builds engine requests."""

    def __init__(self, tokenizer: Any, vocab_size: int, limits: ServerLimits) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = limits
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossinfer-tokenize")

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # -- tokenising -------------------------------------------------------------------------
    async def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the tokenizer's special tokens unless told not to)."""
        return await self._run(self._encode, text, param, add_special_tokens)

    def _encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except Exception as exc:
            logger.warning("tokenizing %s failed", param, exc_info=exc)
            raise _invalid(param, "the tokenizer could not encode this text") from None

    async def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (vLLM's /detokenize)."""
        return str(await self._run(self.tokenizer.decode, token_ids))

    async def completion_prompts(self, prompt: str | list[Any]) -> list[Prompt]:
        """The prompts of a /v1/completions request: text, texts, token ids or lists of them."""
        if isinstance(prompt, str):
            return [Prompt(await self.encode(prompt, "prompt"), prompt)]
        limit = self.limits.max_client_batch_size
        if isinstance(prompt[0], list) or isinstance(prompt[0], str):
            if len(prompt) > limit:
                raise _invalid(
                    "prompt",
                    f"{len(prompt)} prompts are more than the limit of {limit} per request "
                    "(--max-client-batch-size)",
                )
        if isinstance(prompt[0], int):
            return [Prompt(self._check_ids(prompt, "prompt"), None)]
        if isinstance(prompt[0], list):
            return [Prompt(self._check_ids(p, f"prompt[{i}]"), None) for i, p in enumerate(prompt)]
        return [Prompt(await self.encode(p, f"prompt[{i}]"), p) for i, p in enumerate(prompt)]

    def _check_ids(self, ids: Sequence[int], param: str) -> list[int]:
        bad = [t for t in ids if t >= self.vocab_size]
        if bad:
            raise _invalid(
                param, f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        return list(ids)

    async def chat_prompt(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> Prompt:
        """A conversation through the model's chat template (as ``LLM.chat`` renders it),
        with the ``tools`` it may call (server/tools.py)."""
        return await self._run(self.render_chat, messages, add_generation_prompt, tools)

    def render_chat(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> Prompt:
        template = str(getattr(self.tokenizer, "chat_template", None) or "")
        conversation = [_message_dict(m, i) for i, m in enumerate(messages)]
        if "tool_calls" not in template:
            conversation = [_calls_as_text(m) for m in conversation]
        options: dict[str, Any] = {}
        if tools and "tools" in template:
            options["tools"] = tools
        elif tools:
            conversation = _with_tools_system_prompt(conversation, tools)
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **options,
            )
        except jinja2.TemplateError as exc:  # the template's own refusal: meant for the user
            raise _invalid("messages", f"the chat template refused them: {exc}") from None
        except Exception as exc:
            logger.warning("the chat template failed", exc_info=exc)
            raise _invalid("messages", "the chat template could not render them") from None
        return Prompt(self._encode(text, "messages", add_special_tokens=False), text)

    # -- limits -----------------------------------------------------------------------------
    def requests(
        self,
        response_id: str,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        names: Names,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> list[GenerateRequest]:
        """One engine request per prompt, each within the token limits; a prompt without
        max_tokens gets the rest of --max-total-tokens."""
        ids = (
            [response_id]
            if len(prompts) == 1
            else [f"{response_id}-{i}" for i in range(len(prompts))]
        )
        requests = []
        for request_id, prompt in zip(ids, prompts, strict=True):
            max_tokens = self._max_tokens(len(prompt.token_ids), params, names)
            own = (
                params
                if max_tokens == params.max_tokens
                else replace(params, max_tokens=max_tokens)
            )
            requests.append(
                GenerateRequest(
                    request_id, prompt.token_ids, own, prompt.text, cache_salt, lora_request
                )
            )
        return requests

    def _max_tokens(self, num_prompt: int, params: SamplingParams, names: Names) -> int:
        max_input, max_total = self.limits.input_tokens, self.limits.total_tokens
        if num_prompt == 0:
            raise _invalid(names.prompt, "the prompt is empty")
        if num_prompt > max_input:
            raise _invalid(
                names.prompt,
                f"{num_prompt} tokens are more than the limit of {max_input} input tokens "
                "(--max-input-tokens)",
            )
        room = max_total - num_prompt
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise _invalid(
                names.max_tokens,
                f"{num_prompt} prompt tokens + {max_tokens} new tokens are more than the limit "
                f"of {max_total} total tokens (--max-total-tokens; the model's maximum "
                "context length unless set lower)",
            )
        if params.min_tokens > room:
            raise _invalid(
                "min_tokens",
                f"{num_prompt} prompt tokens + min_tokens {params.min_tokens} are more than "
                f"the limit of {max_total} total tokens",
            )
        return max_tokens


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                param = f"messages[{index}].content"
                raise APIError(
                    400,
                    f"{param}: content parts of type {part.type!r} are not supported",
                    param=param,
                    code="unsupported_parameter",
                )
            texts.append(part.text)
        content = "".join(texts)
    extra = message.model_extra or {}
    role = "system" if message.role == "developer" else message.role  # OpenAI's newer name
    result = {**extra, "role": role, "content": content or ""}
    if isinstance(extra.get("tool_calls"), list):
        result["tool_calls"] = [_arguments_as_object(c) for c in extra["tool_calls"]]
    return result


def _arguments_as_object(call: Any) -> Any:
    """A previous tool call with its arguments as an object: OpenAI clients send them as JSON
    text, templates (Qwen2, Llama 3) write them out as objects."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """For a template that cannot show tool calls: an assistant's calls appended to its
    content, in the format the tools' system prompt asks for."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    texts = []
    for call in calls:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        value = {"name": function.get("name"), "arguments": function.get("arguments", {})}
        texts.append(f"{TOOL_CALL_START}{json.dumps(value, ensure_ascii=False)}{TOOL_CALL_END}")
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": "\n".join(filter(None, [message["content"], *texts]))}


def _with_tools_system_prompt(
    conversation: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    prompt = tools_system_prompt(tools)
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        return [{**first, "content": f"{first['content']}\n\n{prompt}"}, *conversation[1:]]
    return [{"role": "system", "content": prompt}, *conversation]
