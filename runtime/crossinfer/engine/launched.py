"""Ranks started by a launcher that sets torch.distributed's env:// variables (torchrun, on
one machine or several): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``.

Every rank runs ``crossinfer serve``; rank 0 serves HTTP and the others become workers. They
join the group through ``Backend.communicator(rank, world, "env://")`` and then open a second,
gloo group for the calls: rank 0 broadcasts each call (the pickled scheduler output, as the
spawned workers get over their pipes) and gathers the replies. A device group (nccl, xla)
carries the model's collectives; the gloo one carries only objects on the host.

While nothing runs, rank 0 pings the ranks every second (``dead``): a rank that died closes
its gloo connections, so the ping fails at once and the engine stops with the reason. (A
machine that vanishes without closing them is noticed at gloo's timeout instead.)
"""

from __future__ import annotations

import os
import traceback
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from crossinfer.engine.workers import WorkerGroup, check_replies, serve_calls

if TYPE_CHECKING:
    from crossinfer.engine.setup import EngineConfig


def launched_ranks() -> tuple[int, int] | None:
    """(rank, world size) when a launcher started this process as one of several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world


def for_launch(config: EngineConfig, world: int) -> EngineConfig:
    """The config with the launcher's world as the tensor-parallel size."""
    if config.tensor_parallel_size not in (1, world):
        raise ValueError(
            f"--tensor-parallel-size {config.tensor_parallel_size} differs from the launcher's "
            f"WORLD_SIZE {world}; under a launcher every rank is one shard"
        )
    return replace(config, tensor_parallel_size=world)


class LaunchedWorkers(WorkerGroup):
    """Ranks 1 .. N-1 started by the launcher, seen from rank 0 (after the group exists)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.control = dist.new_group(backend="gloo")  # every rank creates it, in this order
        self._closed = False

    @property
    def pids(self) -> list[int]:
        return []  # not necessarily on this machine

    def wait_ready(self) -> None:
        replies = self._gather(("ready", None))
        failed = [f"rank {rank}: {detail}" for rank, (kind, detail) in replies if kind != "ready"]
        if failed:
            from crossinfer.engine.errors import EngineFatalError

            raise EngineFatalError("tensor-parallel ranks failed to start: " + "; ".join(failed))

    def send(self, kind: str, payload: Any) -> None:
        dist.broadcast_object_list([(kind, payload)], src=0, group=self.control)

    def collect(self, local_failed: bool = False) -> None:
        check_replies(self._gather(("ok", None)), local_failed)

    def dead(self) -> str | None:
        try:
            self.send("ping", None)
            self.collect()
        except RuntimeError as exc:  # gloo: a peer closed its connection
            return (
                f"a tensor-parallel rank started by the launcher is gone ({exc}); the engine "
                "cannot go on"
            )
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.send("stop", None)
        except RuntimeError:  # a rank is already gone
            pass

    def _gather(self, mine: tuple[str, Any]) -> list[tuple[int, tuple[str, Any]]]:
        replies: list[Any] = [None] * self.world
        dist.gather_object(mine, replies, dst=0, group=self.control)
        return list(enumerate(replies))[1:]


def run_rank(config: EngineConfig, rank: int, world: int) -> int:
    """A launched rank above 0: join, load the shard, run rank 0's calls until it stops."""
    from crossinfer.distributed.tensor_parallel import TensorParallel
    from crossinfer.engine.setup import load_shard
    from crossinfer.registry import resolve_device

    config = for_launch(config, world)
    backend = resolve_device(config.device)
    communicator = backend.communicator(rank, world, "env://")
    control = dist.new_group(backend="gloo")
    try:
        loaded = load_shard(config, backend, TensorParallel(rank, world, communicator))
        ready: tuple[str, Any] = ("ready", None)
    except Exception as exc:  # told to rank 0, which fails to start with it
        ready = ("error", "".join(traceback.format_exception_only(exc)).strip())
    dist.gather_object(ready, None, dst=0, group=control)
    if ready[0] != "ready":
        return 1

    def receive() -> tuple[str, Any] | None:
        call: list[Any] = [None]
        try:
            dist.broadcast_object_list(call, src=0, group=control)
        except RuntimeError:  # rank 0 is gone
            return None
        received: tuple[str, Any] = call[0]
        return received

    def reply(kind: str, detail: Any) -> None:
        dist.gather_object((kind, detail), None, dst=0, group=control)

    serve_calls(loaded, receive, reply)
    communicator.close()
    return 0
