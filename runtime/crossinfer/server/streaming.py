"""Server-sent events in the exact format OpenAI clients parse: ``data: {json}\\n\\n`` per
chunk, one choice per chunk, then ``data: [DONE]\\n\\n``. With
``stream_options.include_usage`` a last chunk carries ``usage`` and no choices.

Each generator closes its output stream in ``finally``: when the client disconnects,
Starlette cancels the generator and the close aborts the requests, freeing their KV blocks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel

from crossinfer.engine.async_engine import OutputStream
from crossinfer.engine.outputs import CompletionOutput, RequestOutput
from crossinfer.server.errors import openai_error_body, stream_error
from crossinfer.server.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from crossinfer.server.responses import (
    ChoiceSpec,
    TokenText,
    chat_logprobs,
    completion_choice,
    new_logprobs,
    usage,
    vllm_prompt_logprobs,
)
from crossinfer.server.tool_stream import ToolStream
from crossinfer.server.tools import ToolPlan, finish_reason

logger = logging.getLogger("crossinfer.server")

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"


def sse(body: BaseModel) -> str:
    """One event: the JSON body on a ``data:`` line, then a blank line."""
    return f"data: {body.model_dump_json()}\n\n"


@dataclass(frozen=True)
class StreamSpec:
    """What the chunks of one streamed response need besides the engine outputs."""

    response_id: str
    model: str
    created: int
    n: int  # samples per prompt: prompt i's sample j is choice i * n + j
    choice: ChoiceSpec  # logprobs, echo and prompt logprobs, as the request asked
    include_usage: bool = False
    tools: ToolPlan = ToolPlan()  # chat: the tools the replies may call

    @property
    def tokens(self) -> TokenText:
        return self.choice.tokens


class _ChoiceTracker:
    """Which samples changed in an output, and whether each is seen for the first time.
    A finished sample is reported once, though later outputs of its group repeat it."""

    def __init__(self, stream: OutputStream, n: int) -> None:
        self._index = {rid: i * n for i, rid in enumerate(stream.request_ids)}
        self._seen: set[tuple[str, int]] = set()
        self._done: set[tuple[str, int]] = set()
        self.last: dict[str, RequestOutput] = {}

    def updates(self, output: RequestOutput) -> list[tuple[int, CompletionOutput, bool]]:
        self.last[output.request_id] = output
        changed = []
        for completion in output.outputs:
            key = (output.request_id, completion.index)
            finished = completion.finish_reason is not None
            if key in self._done or not (completion.num_new_tokens or completion.delta or finished):
                continue
            first = key not in self._seen
            self._seen.add(key)
            if finished:
                self._done.add(key)
            changed.append((self._index[output.request_id] + completion.index, completion, first))
        return changed


def error_event(exc: BaseException) -> str:
    """An event carrying the error that ended a stream, in the OpenAI error shape."""
    return sse(openai_error_body(stream_error(exc)))


async def completion_events(stream: OutputStream, spec: StreamSpec) -> AsyncIterator[str]:
    """The events of a streamed /v1/completions response."""
    tracker = _ChoiceTracker(stream, spec.n)
    sent: dict[int, int] = {}  # choice index -> characters sent (for logprobs' text_offset)
    try:
        async for output in stream:
            for index, completion, first in tracker.updates(output):
                sent_chars = sent.get(index, 0)
                choice = completion_choice(
                    spec.choice, output, completion, index, first=first, sent_chars=sent_chars
                )
                sent[index] = sent_chars + len(choice.text)
                yield sse(_completion_chunk(spec, [choice]))
        if spec.include_usage:
            yield sse(_completion_chunk(spec, [], tracker))
    except Exception as exc:
        yield error_event(exc)
    finally:
        stream.close()
    yield DONE


def _completion_chunk(
    spec: StreamSpec, choices: list[CompletionChoice], tracker: _ChoiceTracker | None = None
) -> CompletionResponse:
    return CompletionResponse(
        id=spec.response_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage(list(tracker.last.values())) if tracker else None,
    )


async def chat_events(stream: OutputStream, spec: StreamSpec) -> AsyncIterator[str]:
    """The events of a streamed /v1/chat/completions response: first each choice's role."""
    tracker = _ChoiceTracker(stream, spec.n)
    try:
        for index in range(spec.n * len(stream.request_ids)):
            role = ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            yield sse(_chat_chunk(spec, [role]))
        scored: set[str] = set()  # requests whose prompt logprobs were sent
        calls: dict[int, ToolStream] = {}  # choice index -> its tool calls, when tools apply
        async for output in stream:
            for index, completion, _ in tracker.updates(output):
                sampled = new_logprobs(completion)
                finished = completion.finish_reason is not None
                if spec.tools.mode == "none":
                    delta = DeltaMessage(content=completion.delta)
                    reason = completion.finish_reason
                else:
                    tool_stream = calls.setdefault(index, ToolStream(spec.tools))
                    content, tool_calls = tool_stream.feed(completion.delta, finished)
                    delta = DeltaMessage(content=content, tool_calls=tool_calls)
                    reason = finish_reason(completion.finish_reason, tool_stream.called)
                choice = ChatStreamChoice(
                    index=index,
                    delta=delta,
                    logprobs=(
                        chat_logprobs(spec.tokens, sampled)
                        if spec.choice.logprobs is not None
                        else None
                    ),
                    finish_reason=reason,
                )
                chunk = _chat_chunk(spec, [choice])
                num_top = spec.choice.prompt_logprobs
                if num_top is not None and output.request_id not in scored:
                    scored.add(output.request_id)
                    chunk.prompt_logprobs = vllm_prompt_logprobs(spec.tokens, output, num_top)
                yield sse(chunk)
        if spec.include_usage:
            yield sse(_chat_chunk(spec, [], tracker))
    except Exception as exc:
        yield error_event(exc)
    finally:
        stream.close()
    yield DONE


def _chat_chunk(
    spec: StreamSpec, choices: list[ChatStreamChoice], tracker: _ChoiceTracker | None = None
) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=spec.response_id,
        created=spec.created,
        model=spec.model,
        choices=choices,
        usage=usage(list(tracker.last.values())) if tracker else None,
    )
