"""The in-process engine client: the ``LLMEngine``'s step loop on one background thread of
the caller's process, streaming each step's outputs to asyncio consumers.

The ``LLMEngine`` is not thread-safe, so exactly one thread (the engine thread) ever calls it:
callers on the event loop post commands (add, abort) to a queue guarded by a condition
variable; the engine thread applies them between steps, runs a step while there is work, and
hands each output to its request's asyncio queue with ``loop.call_soon_threadsafe``. With no
work and no commands the thread blocks on the condition, so an idle server costs nothing.
The server runs the engine in its own process instead (engine/core_client.py); this one is
for tests, tools and ``--no-engine-process``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from crossinfer.engine.errors import EngineFatalError
from crossinfer.engine.frontend import (
    ENGINE_CALLS,
    HEALTH_POLL_S,
    EngineClient,
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    GenerateRequest,
    Sink,
    StreamHub,
    admit,
    post,
    resolve,
    scheduler_stats,
    settle,
)
from crossinfer.engine.llm_engine import LLMEngine
from crossinfer.engine.output_stream import OutputStream
from crossinfer.engine.setup import EngineConfig, LoadedModel

logger = logging.getLogger("crossinfer.engine")


@dataclass
class _Add:
    requests: Sequence[GenerateRequest]
    sink: Sink
    accepted: asyncio.Future[None]


@dataclass
class _Call:
    method: str  # of EngineCore, one of ENGINE_CALLS
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[Any]


# A command for the engine thread: add a batch, abort a request id, or call the core. Applied in
# FIFO order, so an abort posted after an add (a caller cancelled while waiting) always finds
# the request.
_Command = _Add | _Call | str


class AsyncLLMEngine(EngineClient):
    """An ``LLMEngine`` driven by one background thread, for asyncio callers (see
    :class:`EngineClient` for the contract)."""

    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int = 512,
        on_stop: Callable[[BaseException], None] | None = None,
    ) -> None:
        super().__init__(max_waiting, on_stop)
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: list[_Command] = []  # guarded by _cond
        self._hub = StreamHub()  # engine thread only
        self._thread: threading.Thread | None = None
        self._stats = self._snapshot()

    @classmethod
    def from_config(
        cls, config: EngineConfig, loaded: LoadedModel | None = None, max_waiting: int = 512
    ) -> AsyncLLMEngine:
        """Build the engine (loading the model unless ``loaded`` is given); not yet started."""
        return cls(LLMEngine.from_config(config, loaded), max_waiting)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.parts.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def max_logprobs(self) -> int:
        return self.engine.config.max_logprobs

    def stats(self) -> EngineStats:
        return self._stats

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="crossinfer-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self.engine.close()

    # -- requests ---------------------------------------------------------------------------
    def _submit(
        self, requests: Sequence[GenerateRequest], sink: Sink, accepted: asyncio.Future[None]
    ) -> None:
        with self._cond:
            # Checked under the lock that _fail takes, so no add is posted after the drain.
            if self._error is not None or self._stopping:
                raise self._dead_error()
            self._commands.append(_Add(requests, sink, accepted))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._commands.append(request_id)
            self._cond.notify()

    async def _call(self, method: str, *args: Any) -> Any:
        assert method in ENGINE_CALLS, method
        self.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._error is not None or self._stopping:
                raise self._dead_error()
            self._commands.append(_Call(method, args, loop, done))
            self._cond.notify()
        return await done

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
                if not self.engine.has_unfinished_requests():
                    self._stats = self._snapshot()
                    continue
                outputs = self.engine.step()
                self._hub.count_tokens(outputs)
                self._stats = self._snapshot()  # before a woken consumer reads it
                for request_id in self._hub.deliver(outputs):
                    self.engine.abort_request(request_id)  # nobody listens any more
            error: BaseException = EngineDeadError("the engine was shut down")
        except BaseException as exc:  # shared state broke: every waiter must hear of it
            logger.critical("the engine stopped", exc_info=exc)
            error = exc
        self._fail(error)

    def _apply(self, commands: list[_Command]) -> None:
        for command in commands:
            if isinstance(command, str):
                self.engine.abort_request(command)
                self._hub.forget(command)
                continue
            if isinstance(command, _Call):
                try:
                    result = getattr(self.engine.core, command.method)(*command.args)
                except Exception as exc:
                    post(command.loop, settle, command.done, None, exc)
                else:
                    post(command.loop, settle, command.done, result, None)
                continue
            error = admit(
                command.requests,
                self.max_waiting,
                len(self.engine.scheduler.waiting),
                self._add_one,
                self.engine.abort_request,
            )
            if error is None:
                self._hub.register([r.request_id for r in command.requests], command.sink)
            if not post(command.sink.loop, resolve, command.accepted, error) and error is None:
                for request in command.requests:  # nobody can read the outputs any more
                    self.engine.abort_request(request.request_id)
                    self._hub.forget(request.request_id)

    def _add_one(self, request: GenerateRequest) -> None:
        self.engine.add_request(
            request.request_id,
            request.prompt,
            request.params,
            prompt_text=request.prompt_text,
            cache_salt=request.cache_salt,
            lora_request=request.lora_request,
        )

    def _fail(self, error: BaseException) -> None:
        """Tell every waiter that the engine stopped; later adds raise EngineDeadError."""
        with self._cond:
            self._error = error
            pending, self._commands = self._commands, []
        dead = self._notify_stop(error)
        for add in pending:
            if isinstance(add, _Add):
                post(add.sink.loop, resolve, add.accepted, dead)
            elif isinstance(add, _Call):
                post(add.loop, settle, add.done, None, dead)
        self._hub.fail_all(dead)

    def _snapshot(self) -> EngineStats:
        stats = scheduler_stats(self.engine.scheduler, self.engine.num_steps)
        return replace(
            stats,
            num_prompt_tokens=self._hub.num_prompt_tokens,
            num_generation_tokens=self._hub.num_generation_tokens,
        )


__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "GenerateRequest",
    "OutputStream",
]
