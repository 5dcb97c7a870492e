"""Tensor-parallel workers: ranks 1 .. N-1 as processes of their own (multiprocessing, spawn).

Each worker resolves the backend, joins the group through ``Backend.communicator`` (which
binds its device, rank % local devices), loads its shard of the model, allocates its share of
the KV cache (the same blocks as rank 0, its own KV heads) and then mirrors every call of
rank 0's runner: the same steps in the same order, so every rank meets the same collectives.
Rank 0 alone samples; the scheduler and the block bookkeeping exist once, on rank 0.

One pipe per worker carries the calls and the replies (multiprocessing's, as the workers are
multiprocessing's children: nothing to install, and the pickled scheduler output is small).
A worker that dies, or fails where rank 0 did not, fails the call with EngineFatalError
naming it; when rank 0 goes away the pipe closes and the worker exits.
"""

from __future__ import annotations

import abc
import atexit
import logging
import multiprocessing
import os
import signal
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from crossinfer.engine.errors import EngineFatalError

if TYPE_CHECKING:
    from crossinfer.backend import KVCacheSpec, StaticShapes
    from crossinfer.engine.setup import EngineConfig

logger = logging.getLogger("crossinfer.engine")

POLL_S = 0.5  # how often a wait for a reply checks that the worker is alive
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RunnerSpec:
    """What a worker needs to build its runner, decided by rank 0."""

    kv_spec: KVCacheSpec
    num_blocks: int
    block_size: int
    static: StaticShapes | None
    max_logprobs: int


@dataclass
class _Worker:
    rank: int
    process: BaseProcess
    conn: Connection


def local_init_method() -> str:
    """A torch.distributed rendezvous on a free port of this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


class WorkerGroup(abc.ABC):
    """Ranks 1 .. N-1 of one tensor-parallel model, seen from rank 0: started here
    (``SpawnedWorkers``) or by a launcher such as torchrun (engine/launched.py)."""

    @property
    @abc.abstractmethod
    def pids(self) -> list[int]:
        """The workers' process ids where they run on this machine."""

    @abc.abstractmethod
    def wait_ready(self) -> None:
        """Wait until every worker has loaded its shard; raise with a worker's error."""

    @abc.abstractmethod
    def send(self, kind: str, payload: Any) -> None:
        """Start a call (``runner``, ``execute``, ``warm_up``) on every worker."""

    @abc.abstractmethod
    def collect(self, local_failed: bool = False) -> None:
        """Every worker's reply to the last call. A worker error where rank 0 failed as well
        is the same failure (the same inputs); where rank 0 did not, the ranks diverged."""

    @abc.abstractmethod
    def dead(self) -> str | None:
        """Why the group is broken (a worker has exited), or None (also when unknowable)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop every worker."""


def check_replies(replies: list[tuple[int, tuple[str, Any]]], local_failed: bool) -> None:
    """Raise when a worker failed a call that rank 0 did not: the ranks diverged."""
    errors = [f"rank {rank}: {detail}" for rank, (kind, detail) in replies if kind == "error"]
    if errors and not local_failed:
        raise EngineFatalError("tensor-parallel ranks diverged: " + "; ".join(errors))


class SpawnedWorkers(WorkerGroup):
    """Workers started here, as multiprocessing children with a pipe each."""

    def __init__(self, workers: list[_Worker]) -> None:
        self._workers = workers
        self._closed = False

    @classmethod
    def start(cls, config: EngineConfig, init_method: str) -> SpawnedWorkers:
        """Start the workers; each joins the group and loads its shard (see wait_ready)."""
        context = multiprocessing.get_context("spawn")
        workers = []
        size = config.tensor_parallel_size
        for rank in range(1, size):
            parent, child = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(config, rank, size, init_method, child),
                name=f"crossinfer-tp-rank{rank}",
                daemon=True,
            )
            process.start()
            child.close()
            workers.append(_Worker(rank, process, parent))
        group = cls(workers)
        atexit.register(group.close)  # an engine never closed still stops its ranks
        return group

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def wait_ready(self) -> None:
        for worker in self._workers:
            kind, detail = self._reply(worker)
            if kind != "ready":
                raise EngineFatalError(
                    f"tensor-parallel rank {worker.rank} failed to start: {detail}"
                )

    def send(self, kind: str, payload: Any) -> None:
        for worker in self._workers:
            try:
                worker.conn.send((kind, payload))
            except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
                raise EngineFatalError(self._gone(worker)) from exc

    def collect(self, local_failed: bool = False) -> None:
        replies = [(worker.rank, self._reply(worker)) for worker in self._workers]
        check_replies(replies, local_failed)

    def dead(self) -> str | None:
        for worker in self._workers:
            if not worker.process.is_alive():
                return self._gone(worker)
        return None

    def close(self) -> None:
        """Stop every worker and wait for it; kill the ones that do not stop."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.conn.send(("stop", None))
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                pass
        for worker in self._workers:
            worker.process.join(STOP_TIMEOUT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(STOP_TIMEOUT_S)
            worker.conn.close()

    def _reply(self, worker: _Worker) -> tuple[str, Any]:
        while not worker.conn.poll(POLL_S):
            if not worker.process.is_alive():
                raise EngineFatalError(self._gone(worker))
        try:
            reply: tuple[str, Any] = worker.conn.recv()
        except (EOFError, ConnectionResetError) as exc:
            raise EngineFatalError(self._gone(worker)) from exc
        return reply

    @staticmethod
    def _gone(worker: _Worker) -> str:
        worker.process.join(0.1)
        code = worker.process.exitcode
        how = "is still running" if code is None else f"exited with code {code}"
        pid = worker.process.pid
        return f"tensor-parallel rank {worker.rank} (pid {pid}) {how}; the engine cannot go on"


def worker_main(
    config: EngineConfig, rank: int, size: int, init_method: str, conn: Connection
) -> None:
    """A worker process: join, load the shard, then run what rank 0 sends until it stops."""
    from crossinfer.distributed.tensor_parallel import TensorParallel
    from crossinfer.engine.setup import load_shard
    from crossinfer.loader.model_files import NO_PROGRESS_ENV
    from crossinfer.registry import resolve_device

    os.environ[NO_PROGRESS_ENV] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops us
    try:
        backend = resolve_device(config.device)
        communicator = backend.communicator(rank, size, init_method)
        loaded = load_shard(config, backend, TensorParallel(rank, size, communicator))
    except BaseException as exc:  # told to rank 0, which stops the others
        conn.send(("error", "".join(traceback.format_exception_only(exc)).strip()))
        return
    conn.send(("ready", None))

    def receive() -> tuple[str, Any] | None:
        try:
            call: tuple[str, Any] = conn.recv()
        except (EOFError, ConnectionResetError):  # rank 0 is gone
            return None
        return call

    serve_calls(loaded, receive, lambda kind, detail: conn.send((kind, detail)))
    communicator.close()


def serve_calls(
    loaded: Any,
    receive: Callable[[], tuple[str, Any] | None],
    reply: Callable[[str, Any], None],
) -> None:
    """A worker's loop: run each call rank 0 sends, reply "ok" or "error", until it says
    stop (or ``receive`` returns None: rank 0 is gone)."""
    calls = RankCalls(loaded)
    while True:
        call = receive()
        if call is None or call[0] == "stop":
            break
        reply(*calls.run(*call))


class RankCalls:
    """What a worker does with each of rank 0's calls: build its runner, then mirror the
    steps and the warm-up; answer pings. Replies ("ok", None) or ("error", message)."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.runner: Any = None

    def run(self, kind: str, payload: Any) -> tuple[str, Any]:
        try:
            if kind == "runner":
                self.runner = _build_runner(self.loaded, payload)
            elif kind == "execute":
                self.runner.execute(payload)
            elif kind == "warm_up":
                self.runner.warm_up(progress=False)
            elif kind != "ping":  # a ping asks only for the reply: the rank is alive
                raise ValueError(f"unknown call {kind!r}")
        except Exception as exc:
            return ("error", f"{type(exc).__name__}: {exc}")
        return ("ok", None)


def _build_runner(loaded: Any, spec: RunnerSpec) -> Any:
    from crossinfer.engine.runner import ModelRunner

    kv_caches = loaded.backend.allocate_kv_cache(spec.kv_spec, spec.num_blocks)
    return ModelRunner(
        loaded.model,
        loaded.backend,
        kv_caches,
        spec.block_size,
        spec.static,
        spec.max_logprobs,
        samples=False,
        lora=loaded.lora,
    )
