"""The engine for a server: the synchronous step loop on one background thread, streaming each
step's outputs to asyncio consumers.

The ``LLMEngine`` is not thread-safe, so exactly one thread (the engine thread) ever calls it:
callers on the event loop post commands (add, abort) to a queue guarded by a condition
variable; the engine thread applies them between steps, runs a step while there is work, and
hands each output to its request's asyncio queue with ``loop.call_soon_threadsafe``. With no
work and no commands the thread blocks on the condition, so an idle server costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from crossinfer.engine.errors import EngineFatalError, RequestError
from crossinfer.engine.llm_engine import LLMEngine
from crossinfer.engine.output_stream import Observer, OutputStream, StreamItem
from crossinfer.engine.outputs import RequestOutput
from crossinfer.engine.setup import EngineConfig, LoadedModel
from crossinfer.sampling_params import SamplingParams

Prompt = str | Sequence[int]

logger = logging.getLogger("crossinfer.engine")
HEALTH_POLL_S = 1.0  # while idle, how often the engine checks that its ranks are alive


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: the request was refused, and may be retried later."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or its shared state broke); no request can run."""


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt to add. Text is tokenised by the engine thread; a server tokenises on its
    own threads and passes token ids (with the text, for outputs that echo it)."""

    request_id: str
    prompt: Prompt
    params: SamplingParams
    prompt_text: str | None = None  # the text of token-id prompts, if any
    cache_salt: str | None = None  # see LLMEngine.add_request


@dataclass(frozen=True)
class EngineStats:
    """A snapshot taken by the engine thread after each iteration (counters are cumulative)."""

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


@dataclass
class _Sink:
    """Where one request's outputs go: an asyncio queue on the loop that awaits them."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StreamItem]


@dataclass
class _Add:
    requests: Sequence[GenerateRequest]
    sink: _Sink
    accepted: asyncio.Future[None]


# A command for the engine thread: add a batch, or abort a request id. Applied in FIFO order,
# so an abort posted after an add (a caller cancelled while waiting) always finds the request.
_Command = _Add | str


class AsyncLLMEngine:
    """An ``LLMEngine`` driven by one background thread, for asyncio callers.

    ``add_requests`` waits until the engine thread has accepted (or refused) a batch of
    prompts and returns an :class:`OutputStream`; ``generate`` is the one-prompt shorthand.
    Refusals raise ``ValueError`` (the request can never run: too long, bad token ids, more
    sequences than may ever wait) or :class:`EngineOverloadedError` (more than
    ``max_waiting`` sequences already wait). A request that fails inside the engine ends its
    stream with ``RequestFailedError``; the others go on. If the engine itself breaks, every
    stream gets :class:`EngineDeadError`, ``on_stop`` is called with the cause (a server
    exits on it, so that its supervisor restarts it) and ``stop_reason`` says why.
    """

    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int = 512,
        on_stop: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_stop = on_stop
        self.max_waiting = max_waiting
        """Sequences that may wait for admission before new requests are refused; read by
        the engine thread on each add, so it may be changed while running."""
        self._cond = threading.Condition()
        self._commands: list[_Command] = []  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._prefilled: set[str] = set()  # engine thread only: ids with a first output
        self._num_prompt_tokens = 0  # engine thread only
        self._num_generation_tokens = 0  # engine thread only
        self._stats = self._snapshot()

    @classmethod
    def from_config(
        cls, config: EngineConfig, loaded: LoadedModel | None = None, max_waiting: int = 512
    ) -> AsyncLLMEngine:
        """Build the engine (loading the model unless ``loaded`` is given); not yet started."""
        return cls(LLMEngine.from_config(config, loaded), max_waiting)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread. Idempotent; ``add_requests`` calls it too."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="crossinfer-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step; pending streams get EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self.engine.close()

    @property
    def is_healthy(self) -> bool:
        """False once the engine thread has stopped or failed."""
        return self._error is None and not self._stopping

    @property
    def stop_reason(self) -> str | None:
        """Why the engine stopped (a line for /health and the log), or None while it runs."""
        # Shown to anyone (/health needs no key): only our own messages, never exception text.
        error = self._error
        if isinstance(error, EngineDeadError | EngineFatalError):
            return str(error)
        if error is not None:
            return f"the engine failed ({type(error).__name__}); see the server log"
        return "the engine was shut down" if self._stopping else None

    @property
    def tokenizer(self) -> Any:  # a transformers tokenizer, with the chat template
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.parts.max_model_len

    def stats(self) -> EngineStats:
        """The latest snapshot; safe to call from any thread."""
        return self._stats

    # -- requests ---------------------------------------------------------------------------
    async def add_requests(
        self, requests: Sequence[GenerateRequest], observer: Observer | None = None
    ) -> OutputStream:
        """Add prompts together: all are accepted, or none (the first refusal is raised).
        ``observer`` sees every output as the stream yields it."""
        self.start()
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, asyncio.Queue())
        accepted: asyncio.Future[None] = loop.create_future()
        with self._cond:
            # Checked under the lock that _fail takes, so no add is posted after the drain.
            if self._error is not None or self._stopping:
                raise EngineDeadError(f"the engine is not running: {self.stop_reason}")
            self._commands.append(_Add(requests, sink, accepted))
            self._cond.notify()
        try:
            await accepted
        except asyncio.CancelledError:
            # The caller went away before the engine thread answered: do not leave work behind.
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

    def abort(self, request_id: str) -> None:
        """Abort a request (unknown or finished ids are ignored). Thread-safe, never blocks."""
        with self._cond:
            self._commands.append(request_id)
            self._cond.notify()

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (
                        self._commands or self._stopping or self.engine.has_unfinished_requests()
                    ):
                        self._cond.wait(HEALTH_POLL_S)
                        lost = self.engine.lost_reason()
                        if lost is not None:  # a rank died while nothing ran
                            raise EngineFatalError(lost)
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                self._apply(commands)
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._count_tokens(outputs)
                    self._deliver(outputs)
                self._stats = self._snapshot()
            error: BaseException = EngineDeadError("the engine was shut down")
        except BaseException as exc:  # shared state broke: every waiter must hear of it
            logger.critical("the engine stopped", exc_info=exc)
            error = exc
        self._fail(error)

    def _apply(self, commands: list[_Command]) -> None:
        for command in commands:
            if isinstance(command, str):
                self.engine.abort_request(command)
                self._sinks.pop(command, None)
                self._prefilled.discard(command)
                continue
            error = self._try_add(command)
            if not _post(command.sink.loop, _resolve, command.accepted, error) and error is None:
                for request in command.requests:  # nobody can read the outputs any more
                    self.engine.abort_request(request.request_id)
                    self._sinks.pop(request.request_id, None)

    def _try_add(self, add: _Add) -> Exception | None:
        waiting = len(self.engine.scheduler.waiting)
        num_seqs = sum(r.params.n for r in add.requests)
        if num_seqs > self.max_waiting:
            return ValueError(
                f"the request asks for {num_seqs} sequences (prompts x n), more than the "
                f"{self.max_waiting} that may ever wait for admission"
            )
        if waiting + num_seqs > self.max_waiting:
            return EngineOverloadedError(
                f"the server is busy: {waiting} sequences are already waiting (limit "
                f"{self.max_waiting}); retry later"
            )
        added: list[str] = []
        try:
            for request in add.requests:
                self.engine.add_request(
                    request.request_id,
                    request.prompt,
                    request.params,
                    prompt_text=request.prompt_text,
                    cache_salt=request.cache_salt,
                )
                added.append(request.request_id)
        except Exception as exc:  # a refusal (ValueError), or a failure of this request alone
            for request_id in added:
                self.engine.abort_request(request_id)
            if isinstance(exc, ValueError):
                return exc
            logger.error("adding request %s failed", add.requests[0].request_id, exc_info=exc)
            return RequestError("internal error while adding the request; see the server log")
        for request_id in added:
            self._sinks[request_id] = add.sink
        return None

    def _count_tokens(self, outputs: list[RequestOutput]) -> None:
        # A prompt counts once its first token exists (it was computed, not just queued).
        for output in outputs:
            self._num_generation_tokens += sum(c.num_new_tokens for c in output.outputs)
            if output.request_id not in self._prefilled:
                self._prefilled.add(output.request_id)
                self._num_prompt_tokens += len(output.prompt_token_ids)
            if output.finished:
                self._prefilled.discard(output.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # One call_soon_threadsafe per loop per step, not one per output: 32 streams would
        # otherwise wake the loop 32 times a step.
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[StreamItem], StreamItem]]
        ] = {}
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            if output.finished:
                del self._sinks[output.request_id]
            by_loop.setdefault(sink.loop, []).append((sink.queue, output))
        for loop, items in by_loop.items():
            if not _post(loop, _put_all, items):  # that loop is closed: nobody listens
                for _, item in items:
                    if isinstance(item, RequestOutput) and not item.finished:
                        self.engine.abort_request(item.request_id)
                        self._sinks.pop(item.request_id, None)

    def _fail(self, error: BaseException) -> None:
        """Tell every waiter that the engine stopped; later adds raise EngineDeadError."""
        with self._cond:
            self._error = error
            pending, self._commands = self._commands, []
        if self.on_stop is not None and not isinstance(error, EngineDeadError):
            try:  # before the waiters hear of it: they may act on it at once
                self.on_stop(error)
            except Exception:
                logger.exception("the engine's on_stop callback failed")
        dead = EngineDeadError(f"the engine stopped: {self.stop_reason}")
        for add in pending:
            if isinstance(add, _Add):
                _post(add.sink.loop, _resolve, add.accepted, dead)
        for sink in {id(s): s for s in self._sinks.values()}.values():
            _post(sink.loop, sink.queue.put_nowait, dead)
        self._sinks.clear()

    def _snapshot(self) -> EngineStats:
        scheduler = self.engine.scheduler
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
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            num_steps=self.engine.num_steps,
        )


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    """Run ``callback(*args)`` on ``loop`` soon; False when the loop is already closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


def _put_all(items: list[tuple[asyncio.Queue[StreamItem], StreamItem]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "GenerateRequest",
    "OutputStream",
]
