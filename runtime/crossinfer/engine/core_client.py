"""The API server's side of the engine-core process (engine/core_process.py): an
``EngineClient`` whose step loop runs in another process.

This process keeps what is text: it tokenises prompts given as text, and a reader thread
turns the core's token outputs into text (``OutputProcessor``), tells the core which samples
reached a stop string, and hands the outputs to the asyncio streams. The reader also watches
the core process: if it exits, every stream hears of it within ``HEALTH_POLL_S``.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import zmq

from crossinfer.engine.core_process import CoreInfo, open_socket, put, run_engine_core
from crossinfer.engine.errors import EngineFatalError
from crossinfer.engine.frontend import (
    ENGINE_CALLS,
    HEALTH_POLL_S,
    EngineClient,
    EngineDeadError,
    EngineStats,
    GenerateRequest,
    Sink,
    StreamHub,
    post,
    resolve,
    settle,
)
from crossinfer.engine.output_processor import OutputProcessor
from crossinfer.engine.setup import EngineConfig

logger = logging.getLogger("crossinfer.engine")


class EngineStartError(RuntimeError):
    """The engine-core process could not load the engine; the message says why."""


class ProcessEngine(EngineClient):
    """The engine in its own process, for asyncio callers (see :class:`EngineClient`).
    ``launch`` starts the process and returns once the model is loaded."""

    def __init__(
        self,
        process: multiprocessing.process.BaseProcess,
        sockets: tuple[zmq.Context[Any], zmq.Socket[Any], zmq.Socket[Any]],
        ipc_dir: str,
        info: CoreInfo,
        max_waiting: int,
    ) -> None:
        super().__init__(max_waiting)
        self.process = process
        self._context, self._send, self._receive = sockets
        self._ipc_dir = ipc_dir
        self.info = info
        self.processor = OutputProcessor(info.tokenizer)
        self._hub = StreamHub()
        self._lock = threading.Lock()  # processor, hub, pending, the send socket, _error
        self._pending: dict[int, tuple[Sequence[str], Sink, asyncio.Future[None]]] = {}
        self._batch_ids = itertools.count()
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._stats = info.stats
        self._thread: threading.Thread | None = None
        atexit.register(self.shutdown)  # a non-daemonic child must not outlive us

    @classmethod
    def launch(
        cls, config: EngineConfig, max_waiting: int = 512, log_level: str = "info"
    ) -> ProcessEngine:
        """Start the engine-core process and wait until it has loaded the model; raises
        EngineStartError with its reason if it cannot."""
        ipc_dir = tempfile.mkdtemp(prefix="crossinfer-")  # mode 0700: this user's alone
        inbox, outbox = f"ipc://{ipc_dir}/to-core", f"ipc://{ipc_dir}/from-core"
        context: zmq.Context[Any] = zmq.Context()
        send, receive = open_socket(context, zmq.PUSH), open_socket(context, zmq.PULL)
        send.bind(inbox)
        receive.bind(outbox)
        # Not daemonic: the core starts the tensor-parallel ranks as its own children.
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(config, inbox, outbox, os.getpid(), log_level),
            name="crossinfer-engine-core",
        )
        process.start()
        try:
            info = _wait_ready(process, receive)
        except BaseException:
            _stop_process(process, timeout=5.0)
            send.close(linger=0)
            receive.close(linger=0)
            context.term()
            shutil.rmtree(ipc_dir, ignore_errors=True)
            raise
        return cls(process, (context, send, receive), ipc_dir, info, max_waiting)

    @property
    def tokenizer(self) -> Any:
        return self.info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_logprobs(self) -> int:
        return self.info.max_logprobs

    def stats(self) -> EngineStats:
        return self._stats

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="crossinfer-engine-client", daemon=True
            )
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            put(self._send, ("shutdown",))  # fails quietly if the core is gone already
            thread = self._thread
        _stop_process(self.process, timeout)
        if thread is not None:
            thread.join(timeout)
        else:
            self._fail(EngineDeadError("the engine was shut down"))
        self._send.close(linger=0)
        self._receive.close(linger=0)
        self._context.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
        atexit.unregister(self.shutdown)

    # -- requests ---------------------------------------------------------------------------
    def _submit(
        self, requests: Sequence[GenerateRequest], sink: Sink, accepted: asyncio.Future[None]
    ) -> None:
        wire = [self._with_ids(r) for r in requests]  # tokenised here, before the lock
        ids = [r.request_id for r in wire]
        with self._lock:
            if self._error is not None or self._stopping:
                raise self._dead_error()
            batch_id = next(self._batch_ids)
            self._pending[batch_id] = (ids, sink, accepted)
            for request in wire:
                assert not isinstance(request.prompt, str)
                self.processor.add(
                    request.request_id, request.prompt_text, request.prompt, request.params
                )
            self._hub.register(ids, sink)
            if not put(self._send, ("add", batch_id, wire, self.max_waiting)):
                del self._pending[batch_id]
                for request_id in ids:
                    self._forget(request_id)
                raise EngineDeadError("the engine-core process does not take requests")

    async def _call(self, method: str, *args: Any) -> Any:
        assert method in ENGINE_CALLS, method
        self.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._error is not None or self._stopping:
                raise self._dead_error()
            call_id = next(self._batch_ids)
            self._calls[call_id] = (loop, done)
            if not put(self._send, ("call", call_id, method, args)):
                del self._calls[call_id]
                raise EngineDeadError("the engine-core process does not take calls")
        return await done

    def _with_ids(self, request: GenerateRequest) -> GenerateRequest:
        if not isinstance(request.prompt, str):
            return request
        ids = list(self.tokenizer.encode(request.prompt, add_special_tokens=True))
        return replace(request, prompt=ids, prompt_text=request.prompt)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._forget(request_id)
            if self._error is None and not self._stopping:
                put(self._send, ("abort", request_id))  # a core that is gone aborts all

    def _forget(self, request_id: str) -> None:
        self.processor.drop(request_id)
        self._hub.forget(request_id)

    # -- the reader thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if self._receive.poll(int(HEALTH_POLL_S * 1000)):
                    self._handle(self._receive.recv_pyobj())
                elif self._stopping:
                    break
                if not self.process.is_alive() and not self._receive.poll(0):
                    if self._stopping:
                        break
                    raise EngineFatalError(
                        f"the engine-core process exited (code {self.process.exitcode})"
                    )
            error: BaseException = EngineDeadError("the engine was shut down")
        except BaseException as exc:
            logger.critical("the engine stopped: %s", exc)
            error = exc
        self._fail(error)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "outputs":
            self._deliver(message[1], message[2])
        elif kind == "stats":
            self._set_stats(message[1])
        elif kind == "accepted":
            self._accepted(message[1], message[2])
        elif kind == "called":
            with self._lock:
                loop, done = self._calls.pop(message[1])
            post(loop, settle, done, message[2], message[3])
        elif kind == "dead":
            raise EngineFatalError(message[1])
        else:
            raise ValueError(f"unknown engine-core message {kind!r}")

    def _accepted(self, batch_id: int, refusal: BaseException | None) -> None:
        with self._lock:
            ids, sink, accepted = self._pending.pop(batch_id)
            if refusal is not None:
                for request_id in ids:
                    self._forget(request_id)
        post(sink.loop, resolve, accepted, refusal)  # a closed loop: its streams abort

    def _deliver(self, core_outputs: Any, stats: EngineStats) -> None:
        with self._lock:
            processed = self.processor.process(core_outputs)
            for request_id, index in processed.stops:
                put(self._send, ("stop", request_id, index))
            self._hub.count_tokens(processed.outputs)
            self._set_stats(stats)  # before a consumer woken by the outputs reads them
            orphans = self._hub.deliver(processed.outputs)
            for request_id in processed.failed + orphans:
                self._forget(request_id)
                put(self._send, ("abort", request_id))

    def _set_stats(self, stats: EngineStats) -> None:
        self._stats = replace(
            stats,
            num_prompt_tokens=self._hub.num_prompt_tokens,
            num_generation_tokens=self._hub.num_generation_tokens,
        )

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self._error is not None:
                return
            self._error = error
            pending, self._pending = self._pending, {}
            calls, self._calls = self._calls, {}
        dead = self._notify_stop(error)
        for _, sink, accepted in pending.values():
            post(sink.loop, resolve, accepted, dead)
        for loop, done in calls.values():
            post(loop, settle, done, None, dead)
        with self._lock:
            self._hub.fail_all(dead)


def _wait_ready(process: multiprocessing.process.BaseProcess, receive: zmq.Socket[Any]) -> CoreInfo:
    while True:
        if receive.poll(int(HEALTH_POLL_S * 1000)):
            message = receive.recv_pyobj()
            if message[0] == "ready":
                info: CoreInfo = message[1]
                return info
            raise EngineStartError(message[1])
        if not process.is_alive():
            raise EngineStartError(
                f"the engine-core process exited while loading (code {process.exitcode}); "
                "see its log above"
            )


def _stop_process(process: multiprocessing.process.BaseProcess, timeout: float) -> None:
    """Wait for the process to exit; terminate, then kill it, if it does not."""
    process.join(timeout)
    for stop in (process.terminate, process.kill):
        if not process.is_alive():
            return
        stop()
        process.join(5.0)
