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
from typing import Any

from pydantic import BaseModel

from crossinfer.engine.async_engine import OutputStream
from crossinfer.engine.outputs import CompletionOutput, RequestOutput
from crossinfer.server.errors import APIError
from crossinfer.server.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
)
from crossinfer.server.responses import (
    TokenText,
    chat_logprobs,
    completion_logprobs,
    new_logprobs,
    prompt_text,
    usage,
)

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
    tokens: TokenText
    logprobs: bool = False
    include_usage: bool = False
    echo: bool = False


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


def error_event(exc: Exception) -> str:
    """An event carrying the error that ended a stream, in the OpenAI error shape."""
    if isinstance(exc, APIError):
        info = ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    else:
        logger.exception("stream failed")
        info = ErrorInfo(message=f"internal error: {exc}", type="server_error")
    return sse(ErrorResponse(error=info))


async def completion_events(
    stream: OutputStream, spec: StreamSpec, tokenizer: Any
) -> AsyncIterator[str]:
    """The events of a streamed /v1/completions response."""
    tracker = _ChoiceTracker(stream, spec.n)
    sent: dict[int, int] = {}  # choice index -> characters sent (for logprobs' text_offset)
    try:
        async for output in stream:
            for index, completion, first in tracker.updates(output):
                text = completion.delta
                if first and spec.echo:
                    text = prompt_text(tokenizer, output) + text
                logprobs = None
                if spec.logprobs:
                    start = sent.get(index, 0) + len(text) - len(completion.delta)
                    sampled = new_logprobs(completion)
                    logprobs = completion_logprobs(spec.tokens, sampled, start)
                sent[index] = sent.get(index, 0) + len(text)
                choice = CompletionChoice(
                    index=index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                )
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
        async for output in stream:
            for index, completion, _ in tracker.updates(output):
                sampled = new_logprobs(completion)
                choice = ChatStreamChoice(
                    index=index,
                    delta=DeltaMessage(content=completion.delta),
                    logprobs=chat_logprobs(spec.tokens, sampled) if spec.logprobs else None,
                    finish_reason=completion.finish_reason,
                )
                yield sse(_chat_chunk(spec, [choice]))
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
