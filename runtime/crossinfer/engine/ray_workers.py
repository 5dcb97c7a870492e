"""Tensor-parallel workers as Ray actors (``--distributed-executor-backend ray``), for users
who already run a Ray cluster: Ray places ranks 1 .. N-1 (one CPU, or one GPU, each) in a
placement group, wherever the cluster has room; rank 0 stays the engine core's own process.

Each actor joins the group through ``Backend.communicator`` and loads its shard, like a
spawned worker; rank 0's runner calls become actor method calls (``RankCalls.run``), and the
replies come back through Ray's object store. Ray reports an actor that died on the next call;
while idle, ``dead`` pings every actor. Connects to the cluster that ``RAY_ADDRESS`` (or
``ray start``) names, else starts a local Ray instance for this process.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from crossinfer.engine.errors import EngineFatalError
from crossinfer.engine.workers import RankCalls, WorkerGroup, check_replies

if TYPE_CHECKING:
    from crossinfer.engine.setup import EngineConfig

logger = logging.getLogger("crossinfer.engine")

PING_TIMEOUT_S = 5.0
GPU_BACKENDS = ("cuda", "rocm")  # the backends whose devices Ray counts as "GPU"


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ValueError(
            "--distributed-executor-backend ray needs Ray: pip install 'crossinfer[ray]' "
            "(or use the default, mp)"
        ) from exc
    return ray


class _RankActor:
    """One rank in a Ray worker process."""

    def __init__(self, config: EngineConfig, rank: int, size: int, init_method: str) -> None:
        self.args = (config, rank, size, init_method)
        self.calls: RankCalls | None = None
        self.communicator: Any = None

    def load(self) -> tuple[str, Any]:
        from crossinfer.distributed.tensor_parallel import TensorParallel
        from crossinfer.engine.setup import load_shard
        from crossinfer.loader.model_files import NO_PROGRESS_ENV
        from crossinfer.registry import resolve_device

        os.environ[NO_PROGRESS_ENV] = "1"
        config, rank, size, init_method = self.args
        try:
            backend = resolve_device(config.device)
            self.communicator = backend.communicator(rank, size, init_method)
            self.calls = RankCalls(
                load_shard(config, backend, TensorParallel(rank, size, self.communicator))
            )
        except Exception as exc:
            return ("error", f"{type(exc).__name__}: {exc}")
        return ("ready", os.getpid())

    def call(self, kind: str, payload: Any) -> tuple[str, Any]:
        assert self.calls is not None, "load first"
        return self.calls.run(kind, payload)

    def ping(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self.communicator is not None:
            self.communicator.close()


class RayWorkers(WorkerGroup):
    """Ranks 1 .. N-1 as Ray actors in one placement group."""

    def __init__(self, ray: Any, actors: list[Any], group: Any, owns_ray: bool) -> None:
        self._ray = ray
        self._actors = actors  # rank i + 1
        self._group = group
        self._owns_ray = owns_ray
        self._pending: list[Any] = [a.load.remote() for a in actors]
        self._pids: list[int] = []
        self._closed = False

    @classmethod
    def start(cls, config: EngineConfig) -> tuple[RayWorkers, str]:
        """Place and start the actors; returns them and the rendezvous rank 0 joins."""
        ray = import_ray()
        owns_ray = not ray.is_initialized()
        if owns_ray:  # RAY_ADDRESS, a running `ray start` cluster, or a local instance
            ray.init(log_to_driver=False, include_dashboard=False)
        size = config.tensor_parallel_size
        resource = "GPU" if config.device in GPU_BACKENDS else "CPU"
        group = ray.util.placement_group([{resource: 1}] * (size - 1), strategy="PACK")
        ray.get(group.ready())
        host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{_free_port(host)}"
        remote = ray.remote(_RankActor)
        strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy
        actors = [
            remote.options(
                num_cpus=1 if resource == "CPU" else 0,
                num_gpus=1 if resource == "GPU" else 0,
                scheduling_strategy=strategy(group, placement_group_bundle_index=rank - 1),
            ).remote(config, rank, size, init_method)
            for rank in range(1, size)
        ]
        return cls(ray, actors, group, owns_ray), init_method

    @property
    def pids(self) -> list[int]:
        return list(self._pids)

    def wait_ready(self) -> None:
        replies = self._get()
        for rank, (kind, detail) in enumerate(replies, start=1):
            if kind != "ready":
                raise EngineFatalError(f"tensor-parallel rank {rank} failed to start: {detail}")
            self._pids.append(detail)

    def send(self, kind: str, payload: Any) -> None:
        self._pending = [a.call.remote(kind, payload) for a in self._actors]

    def collect(self, local_failed: bool = False) -> None:
        check_replies(list(enumerate(self._get(), start=1)), local_failed)

    def dead(self) -> str | None:
        try:
            self._ray.get([a.ping.remote() for a in self._actors], timeout=PING_TIMEOUT_S)
        except Exception as exc:
            return _lost(exc)
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        try:
            ray.get([a.stop.remote() for a in self._actors], timeout=PING_TIMEOUT_S)
        except Exception:  # dead or stuck: killed below either way
            pass
        for actor in self._actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self._group)
        if self._owns_ray:
            ray.shutdown()

    def _get(self) -> list[tuple[str, Any]]:
        pending, self._pending = self._pending, []
        try:
            replies: list[tuple[str, Any]] = self._ray.get(pending)
        except Exception as exc:
            raise EngineFatalError(_lost(exc)) from exc
        return replies


def _lost(exc: BaseException) -> str:
    return (
        f"a tensor-parallel rank's Ray actor is gone ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); the engine cannot go on"
    )


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port
