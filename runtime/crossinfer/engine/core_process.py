"""The engine-core process: the scheduler, the KV bookkeeping, the runner (and its
tensor-parallel ranks) and the step loop, apart from the API server's process.

The API server does HTTP, tokenising, chat templates and detokenising; it talks to this
process over two ZeroMQ PUSH/PULL sockets on private ``ipc://`` paths, one each way, with
pickled messages (both ends are this program: nothing else can reach the paths, which lie in
a directory only this user can enter). ZeroMQ rather than multiprocessing pipes: sends never
block on a slow reader, messages arrive whole, and a poll with a timeout is one call, which is
what a step loop that must also notice dead ranks and a dead parent needs.

Messages to the core: ``("add", batch_id, requests, max_waiting)``, ``("abort", request_id)``,
``("stop", request_id, index)`` (a stop string ended that sample), ``("call", call_id, method,
args)`` (an ``ENGINE_CALLS`` method of the core, such as loading a LoRA adapter) and
``("shutdown",)``. From the core: ``("ready", CoreInfo)`` or ``("failed", message)`` once, then
``("accepted", batch_id, refusal or None)``, ``("called", call_id, result, error or None)``,
``("outputs", [CoreOutput], EngineStats)``,
``("stats", EngineStats)`` and, if the engine breaks, ``("dead", message)``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import zmq

from crossinfer.engine.core import EngineCore
from crossinfer.engine.errors import EngineFatalError
from crossinfer.engine.frontend import (
    ENGINE_CALLS,
    HEALTH_POLL_S,
    EngineStats,
    GenerateRequest,
    admit,
    public_reason,
    scheduler_stats,
)
from crossinfer.engine.setup import EngineConfig, build_engine_parts, load_model

logger = logging.getLogger("crossinfer.engine")


@dataclass(frozen=True)
class CoreInfo:
    """What the API server needs from the loaded engine."""

    tokenizer: Any  # a transformers tokenizer (it pickles whole, chat template included)
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    model_path: str
    stats: EngineStats


def open_socket(context: zmq.Context[Any], kind: int) -> zmq.Socket[Any]:
    """A socket whose sends never wait for a slow reader (no high-water mark): see ``put``."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.SNDHWM, 0)
    return socket


def put(socket: zmq.Socket[Any], message: tuple[Any, ...]) -> bool:
    """Send without blocking; False when the other end is gone (a PUSH socket with no peer
    would otherwise wait for one forever)."""
    try:
        socket.send_pyobj(message, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


class PeerGone(RuntimeError):
    """The other process no longer reads this socket."""


def run_engine_core(
    config: EngineConfig, inbox: str, outbox: str, parent_pid: int, log_level: str
) -> None:
    """The process's entry point: load, say ready (or why not), then serve until told to
    stop, until the API server's process is gone, or until the engine breaks (exit 1)."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    signal.signal(signal.SIGTERM, _exit_on_signal)  # unwinds, so the ranks are closed
    context: zmq.Context[Any] = zmq.Context()
    receive = open_socket(context, zmq.PULL)
    receive.connect(inbox)
    send = open_socket(context, zmq.PUSH)
    send.connect(outbox)
    code = 0
    try:
        try:
            core = EngineCore(build_engine_parts(config, load_model(config)))
        except Exception as exc:  # a missing backend, a bad model path: said, not a traceback
            logger.debug("the engine core did not start", exc_info=exc)
            _put_or_wait(send, ("failed", f"{type(exc).__name__}: {exc}"))
            code = 1
            return
        _put_or_wait(send, ("ready", _info(core)))
        try:
            _CoreServer(core, receive, send, parent_pid).run()
        except PeerGone:
            logger.warning("the API server's process is gone; the engine core stops")
        except BaseException as exc:
            logger.critical("the engine core stopped", exc_info=exc)
            put(send, ("dead", public_reason(exc)))
            code = 1
        finally:
            core.close()
    finally:
        send.close(linger=2000)  # the last message still goes out
        receive.close(linger=0)
        context.term()
        sys.exit(code)


def _put_or_wait(socket: zmq.Socket[Any], message: tuple[Any, ...]) -> None:
    """Send once the connection is up (the first message may race the connect)."""
    for _ in range(100):
        if put(socket, message):
            return
        time.sleep(0.05)
    raise PeerGone("the API server does not listen")


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _info(core: EngineCore) -> CoreInfo:
    loaded = core.parts.loaded
    return CoreInfo(
        tokenizer=loaded.tokenizer,
        max_model_len=core.parts.max_model_len,
        vocab_size=core.vocab_size,
        max_logprobs=core.config.max_logprobs,
        model_path=loaded.model_files.path,
        stats=scheduler_stats(core.scheduler, core.num_steps),
    )


class _CoreServer:
    """The step loop: drain the commands, step while there is work, send what changed."""

    def __init__(
        self, core: EngineCore, receive: zmq.Socket[Any], send: zmq.Socket[Any], parent_pid: int
    ) -> None:
        self.core = core
        self.receive = receive
        self.send = send
        self.parent_pid = parent_pid

    def run(self) -> None:
        core = self.core
        while True:
            busy = core.has_unfinished_requests()
            if not self.receive.poll(0 if busy else int(HEALTH_POLL_S * 1000)) and not busy:
                lost = core.lost_reason()
                if lost is not None:  # a rank died while nothing ran
                    raise EngineFatalError(lost)
            if os.getppid() != self.parent_pid:  # the API server is gone: do not linger
                raise PeerGone("the API server's process exited")
            commands = self._drain()
            if not self._apply(commands):
                return
            if core.has_unfinished_requests():
                outputs = core.step()
                self._put(("outputs", outputs, self._stats()))
            elif commands:
                self._put(("stats", self._stats()))

    def _put(self, message: tuple[Any, ...]) -> None:
        if not put(self.send, message):
            raise PeerGone("the API server no longer reads the engine's outputs")

    def _drain(self) -> list[tuple[Any, ...]]:
        commands = []
        while True:
            try:
                commands.append(self.receive.recv_pyobj(zmq.NOBLOCK))
            except zmq.Again:
                return commands

    def _apply(self, commands: list[tuple[Any, ...]]) -> bool:
        """Apply in order; False on shutdown."""
        core = self.core
        for command in commands:
            kind = command[0]
            if kind == "add":
                _, batch_id, requests, max_waiting = command
                waiting = len(core.scheduler.waiting)
                refusal = admit(requests, max_waiting, waiting, self._add, core.abort_request)
                self._put(("accepted", batch_id, refusal))
            elif kind == "abort":
                core.abort_request(command[1])
            elif kind == "stop":
                core.stop_sample(command[1], command[2])
            elif kind == "call":
                _, call_id, method, args = command
                assert method in ENGINE_CALLS, method
                try:
                    result, error = getattr(core, method)(*args), None
                except Exception as exc:  # the caller's error (a bad adapter folder): theirs
                    result, error = None, exc
                self._put(("called", call_id, result, error))
            elif kind == "shutdown":
                return False
            else:
                raise ValueError(f"unknown engine-core command {kind!r}")
        return True

    def _add(self, request: GenerateRequest) -> None:
        assert not isinstance(request.prompt, str), "the API server sends token ids"
        self.core.add_request(
            request.request_id,
            request.prompt,
            request.params,
            cache_salt=request.cache_salt,
            lora_request=request.lora_request,
        )

    def _stats(self) -> EngineStats:
        return scheduler_stats(self.core.scheduler, self.core.num_steps)
