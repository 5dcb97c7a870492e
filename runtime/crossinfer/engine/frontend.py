"""What both engine clients share (the in-process ``AsyncLLMEngine`` and the
``ProcessEngine`` in front of an engine-core process): the request and stats types, the
admission rule, and the hub that hands outputs to the asyncio streams that wait for them."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from crossinfer.engine.errors import EngineFatalError, RequestError
from crossinfer.engine.output_stream import Observer, OutputStream, StreamItem
from crossinfer.engine.outputs import RequestOutput
from crossinfer.engine.scheduler import Scheduler
from crossinfer.lora.request import LoRARequest
from crossinfer.sampling_params import SamplingParams

Prompt = str | Sequence[int]
ENGINE_CALLS = frozenset({"add_lora", "remove_lora"})  # what _call may run in the engine core

logger = logging.getLogger("crossinfer.engine")
HEALTH_POLL_S = 1.0  # while idle, how often the engine checks that its ranks are alive


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: the request was refused, and may be retried later."""


class EngineDeadError(RuntimeError):
    """The engine stopped (shut down, or its shared state broke); no request can run."""


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt to add. A server tokenises on its own threads and passes token ids (with
    the text, for outputs that echo it); text is tokenised by the engine client."""

    request_id: str
    prompt: Prompt
    params: SamplingParams
    prompt_text: str | None = None  # the text of token-id prompts, if any
    cache_salt: str | None = None  # see LLMEngine.add_request
    lora_request: LoRARequest | None = None  # the adapter, or None for the base model


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken after each engine iteration (counters are cumulative)."""

    num_running: int  # sequences in the running batch (n > 1 samples count separately)
    num_waiting: int  # sequences waiting for admission (new or preempted)
    num_blocks: int
    num_free_blocks: int
    kv_cache_usage: float  # fraction of blocks held by a request
    num_prefix_queried_tokens: int
    num_prefix_hit_tokens: int
    num_preemptions: int
    num_prompt_tokens: int  # prompt tokens of requests that produced their first token
    num_generation_tokens: int  # tokens sampled, over all requests
    num_steps: int


def public_reason(error: BaseException) -> str:
    """Why an engine stopped on ``error``, as anyone may read it (/health needs no key): our
    own messages only, never exception text from elsewhere."""
    if isinstance(error, EngineDeadError | EngineFatalError):
        return str(error)
    return f"the engine failed ({type(error).__name__}); see the server log"


def scheduler_stats(scheduler: Scheduler, num_steps: int) -> EngineStats:
    """The scheduler's and the cache's part of the stats (the token counters are zero: the
    client that sees the outputs counts them)."""
    kv = scheduler.kv_cache
    return EngineStats(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_blocks=kv.num_blocks,
        num_free_blocks=kv.num_free_blocks,
        kv_cache_usage=kv.usage,
        num_prefix_queried_tokens=kv.num_prefix_queried_tokens,
        num_prefix_hit_tokens=kv.num_prefix_hit_tokens,
        num_preemptions=scheduler.num_preemptions,
        num_prompt_tokens=0,
        num_generation_tokens=0,
        num_steps=num_steps,
    )


def admit(
    requests: Sequence[GenerateRequest],
    max_waiting: int,
    num_waiting: int,
    add: Callable[[GenerateRequest], None],
    abort: Callable[[str], None],
) -> Exception | None:
    """Add a batch whole or not at all; returns the refusal, or None. ``ValueError``: it can
    never run; ``EngineOverloadedError``: too many sequences wait now; ``RequestError``: adding
    failed inside the engine (the traceback goes to the log)."""
    num_seqs = sum(r.params.n for r in requests)
    if num_seqs > max_waiting:
        return ValueError(
            f"the request asks for {num_seqs} sequences (prompts x n), more than the "
            f"{max_waiting} that may ever wait for admission"
        )
    if num_waiting + num_seqs > max_waiting:
        return EngineOverloadedError(
            f"the server is busy: {num_waiting} sequences are already waiting (limit "
            f"{max_waiting}); retry later"
        )
    added: list[str] = []
    try:
        for request in requests:
            add(request)
            added.append(request.request_id)
    except Exception as exc:  # a refusal (ValueError), or a failure of this request alone
        for request_id in added:
            abort(request_id)
        if isinstance(exc, ValueError):
            return exc
        logger.error("adding request %s failed", requests[0].request_id, exc_info=exc)
        return RequestError("internal error while adding the request; see the server log")
    return None


@dataclass
class Sink:
    """Where one request's outputs go: an asyncio queue on the loop that awaits them."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StreamItem]


class StreamHub:
    """The streams of the requests in flight, and the token counters for the metrics. Not
    thread-safe: its owner calls it from one thread, or under its own lock."""

    def __init__(self) -> None:
        self._sinks: dict[str, Sink] = {}
        self._prefilled: set[str] = set()  # ids with a first output
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    def register(self, request_ids: Sequence[str], sink: Sink) -> None:
        for request_id in request_ids:
            self._sinks[request_id] = sink

    def forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._prefilled.discard(request_id)

    def deliver(self, outputs: Sequence[RequestOutput]) -> list[str]:
        """Hand outputs to their streams; returns the unfinished requests whose stream's loop
        is closed (nobody can read them any more: abort them). Count them first."""
        # One call_soon_threadsafe per loop per step, not one per output: 32 streams would
        # otherwise wake the loop 32 times a step.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[StreamItem], StreamItem]]]
        by_loop = {}
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            if output.finished:
                del self._sinks[output.request_id]
            by_loop.setdefault(sink.loop, []).append((sink.queue, output))
        orphans: list[str] = []
        for loop, items in by_loop.items():
            if not post(loop, _put_all, items):
                for _, item in items:
                    if isinstance(item, RequestOutput) and not item.finished:
                        orphans.append(item.request_id)
                        self.forget(item.request_id)
        return orphans

    def fail_all(self, error: BaseException) -> None:
        """End every stream with ``error``."""
        for sink in {id(s): s for s in self._sinks.values()}.values():
            post(sink.loop, sink.queue.put_nowait, error)
        self._sinks.clear()

    def count_tokens(self, outputs: Sequence[RequestOutput]) -> None:
        """Add outputs to the token counters (before the stats that a consumer woken by the
        outputs may read are taken)."""
        # A prompt counts once its first token exists (it was computed, not just queued).
        for output in outputs:
            self.num_generation_tokens += sum(c.num_new_tokens for c in output.outputs)
            if output.request_id not in self._prefilled:
                self._prefilled.add(output.request_id)
                self.num_prompt_tokens += len(output.prompt_token_ids)
            if output.finished:
                self._prefilled.discard(output.request_id)


def resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    """``settle`` for a future without a result."""
    settle(future, None, error)


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Set ``future``'s result, or its error, unless the caller was cancelled meanwhile."""
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    """Run ``callback(*args)`` on ``loop`` soon; False when the loop is already closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


def _put_all(items: list[tuple[asyncio.Queue[StreamItem], StreamItem]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class EngineClient(ABC):
    """The engine as asyncio callers (the server) see it, wherever its step loop runs.

    ``add_requests`` waits until the engine has accepted (or refused) a batch of prompts and
    returns an :class:`OutputStream`; ``generate`` is the one-prompt shorthand. Refusals raise
    ``ValueError`` (the request can never run: too long, bad token ids, more sequences than
    may ever wait) or :class:`EngineOverloadedError` (more than ``max_waiting`` sequences
    already wait). A request that fails inside the engine ends its stream with
    ``RequestFailedError``; the others go on. If the engine itself breaks, every stream gets
    :class:`EngineDeadError`, ``on_stop`` is called with the cause (a server exits on it, so
    that its supervisor restarts it) and ``stop_reason`` says why.
    """

    def __init__(
        self, max_waiting: int, on_stop: Callable[[BaseException], None] | None = None
    ) -> None:
        self.on_stop = on_stop
        self.max_waiting = max_waiting
        """Sequences that may wait for admission before new requests are refused; read on
        each add, so it may be changed while running."""
        self._error: BaseException | None = None
        self._stopping = False

    # -- what the engine is -----------------------------------------------------------------
    @property
    @abstractmethod
    def tokenizer(self) -> Any:  # a transformers tokenizer, with the chat template
        ...

    @property
    @abstractmethod
    def max_model_len(self) -> int: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def max_logprobs(self) -> int: ...

    @abstractmethod
    def stats(self) -> EngineStats:
        """The latest snapshot; safe to call from any thread."""

    # -- lifecycle --------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Start the step loop. Idempotent; ``add_requests`` calls it too."""

    @abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step loop after its current step; pending streams get EngineDeadError."""

    @property
    def is_healthy(self) -> bool:
        """False once the engine has stopped or failed."""
        return self._error is None and not self._stopping

    @property
    def stop_reason(self) -> str | None:
        """Why the engine stopped (a line for /health and the log), or None while it runs."""
        if self._error is not None:
            return public_reason(self._error)
        return "the engine was shut down" if self._stopping else None

    # -- requests ---------------------------------------------------------------------------
    async def add_requests(
        self, requests: Sequence[GenerateRequest], observer: Observer | None = None
    ) -> OutputStream:
        """Add prompts together: all are accepted, or none (the first refusal is raised).
        ``observer`` sees every output as the stream yields it."""
        self.start()
        loop = asyncio.get_running_loop()
        sink = Sink(loop, asyncio.Queue())
        accepted: asyncio.Future[None] = loop.create_future()
        self._submit(requests, sink, accepted)
        try:
            await accepted
        except asyncio.CancelledError:
            # The caller went away before the engine answered: do not leave work behind.
            for request in requests:
                self.abort(request.request_id)
            raise
        return OutputStream([r.request_id for r in requests], sink.queue, self.abort, observer)

    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs, step by step; closing the iterator aborts it."""
        stream = await self.add_requests([GenerateRequest(request_id, prompt, params)])
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    async def add_lora(self, lora: LoRARequest) -> None:
        """Read and check an adapter in the engine; raises ValueError with the reason."""
        await self._call("add_lora", lora)

    async def remove_lora(self, lora_int_id: int) -> None:
        """Forget an adapter's weights in the engine's host memory."""
        await self._call("remove_lora", lora_int_id)

    @abstractmethod
    async def _call(self, method: str, *args: Any) -> Any:
        """Run ``EngineCore.<method>(*args)`` (one of ``ENGINE_CALLS``) between steps, on the
        engine's thread or process; returns its result or raises what it raised."""

    @abstractmethod
    def _submit(
        self, requests: Sequence[GenerateRequest], sink: Sink, accepted: asyncio.Future[None]
    ) -> None:
        """Post a batch to the engine; ``accepted`` is resolved (on ``sink.loop``) with None
        or the refusal. Raises EngineDeadError when the engine no longer runs."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort a request (unknown or finished ids are ignored). Thread-safe, never blocks."""

    def _dead_error(self) -> EngineDeadError:
        return EngineDeadError(f"the engine is not running: {self.stop_reason}")

    def _notify_stop(self, error: BaseException) -> EngineDeadError:
        """Tell ``on_stop`` why the engine stopped (``_error`` is set; before the waiters hear
        of it: they may act on it at once); returns the error every waiter gets."""
        if self.on_stop is not None and not isinstance(error, EngineDeadError):
            try:
                self.on_stop(error)
            except Exception:
                logger.exception("the engine's on_stop callback failed")
        return EngineDeadError(f"the engine stopped: {self.stop_reason}")
