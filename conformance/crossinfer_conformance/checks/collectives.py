"""L4 collectives: world size 2, two local processes joined over tcp:// on a free port.

The group runs once per worker, when the first L4 case needs it; every rank runs every
collective on seeded inputs and reports each result as it finishes, so one collective that
hangs or raises still leaves the others judged. Results are checked against the arithmetic.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import time
from typing import TYPE_CHECKING, Any

import torch

from crossinfer_conformance.cases import Case
from crossinfer_conformance.outcome import CheckFailed, describe_exc

if TYPE_CHECKING:
    from crossinfer.backend import Communicator
    from crossinfer_conformance.context import CheckContext

OPS = ("all_reduce", "all_gather", "broadcast", "barrier")
WORLD_SIZE = 2
GROUP_TIMEOUT_S = 240.0
BARRIER_DELAY_S = 0.5
"""Rank 1 enters the barrier this late; rank 0 must not leave it before."""

Results = dict[str, dict[int, dict[str, Any]]]


def check_collective(ctx: CheckContext, case: Case) -> None:
    """The collective named by the case gave the mathematical result on every rank."""
    if "collectives" not in ctx.memo:
        ctx.memo["collectives"] = _run_group(ctx)
    results: Results = ctx.memo["collectives"]
    per_rank = results.get(case.check, {})
    for rank in range(WORLD_SIZE):
        got = per_rank.get(rank)
        if got is None:
            problem = results.get("group", {}).get(rank, {}).get("error", "")
            raise CheckFailed(
                f"rank {rank} never finished {case.check}" + (f": {problem}" if problem else "")
            )
        if got.get("error"):
            raise CheckFailed(f"rank {rank}: {case.check} raised {got['error']}")
    _VERIFY[case.check](per_rank)


def _run_group(ctx: CheckContext) -> Results:
    spawn = multiprocessing.get_context("spawn")
    messages: Any = spawn.Queue()
    port = _free_port()
    ranks = [
        spawn.Process(target=_rank_main, args=(r, ctx.info.name, port, ctx.seed, messages))
        for r in range(WORLD_SIZE)
    ]
    for process in ranks:
        process.start()
    results = _collect(messages, ranks)
    for rank, process in enumerate(ranks):
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()
        if process.exitcode:
            group = results.setdefault("group", {}).setdefault(rank, {})
            group.setdefault("error", f"the rank process exited with code {process.exitcode}")
    return results


def _collect(messages: Any, ranks: list[Any]) -> Results:
    results: Results = {}
    finished: set[int] = set()
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while len(finished) < WORLD_SIZE and time.monotonic() < deadline:
        try:
            op, rank, result = messages.get(timeout=1.0)
        except queue.Empty:
            if not any(process.is_alive() for process in ranks):
                break
            continue
        results.setdefault(op, {})[rank] = result
        if op == "group":
            finished.add(rank)
            if result.get("error"):
                # The other rank now waits for a peer that will never come; give it a moment
                # to report, not the whole timeout.
                deadline = min(deadline, time.monotonic() + 10.0)
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, name: str, port: int, seed: int, messages: Any) -> None:
    """One rank: join the group, run every collective, report each result as it comes."""
    from crossinfer.registry import resolve_device

    torch.set_num_threads(1)
    try:
        backend = resolve_device(name)
        device = backend.device()
        comm = backend.communicator(rank, WORLD_SIZE, f"tcp://127.0.0.1:{port}")
    except Exception as exc:
        messages.put(("group", rank, {"error": f"joining the group raised {describe_exc(exc)}"}))
        return
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    try:
        for op in OPS:
            try:
                result = _RUN[op](comm, device, rank, gen)
            except Exception as exc:
                result = {"error": describe_exc(exc)}
            messages.put((op, rank, result))
    finally:
        comm.close()
        messages.put(("group", rank, {}))


def _host(tensor: torch.Tensor) -> list[Any]:
    return list(tensor.detach().to("cpu").tolist())


def _run_all_reduce(comm: Communicator, device: torch.device, rank: int, gen: Any) -> dict:
    given = torch.randn(3, 4, generator=gen)
    tensor = given.clone().to(device)
    returned = comm.all_reduce(tensor)
    return {"input": _host(given), "returned": _host(returned), "tensor": _host(tensor)}


def _run_all_gather(comm: Communicator, device: torch.device, rank: int, gen: Any) -> dict:
    given = torch.randn(2, 3, generator=gen)
    returned = comm.all_gather(given.to(device), dim=1)
    return {"input": _host(given), "returned": _host(returned)}


def _run_broadcast(comm: Communicator, device: torch.device, rank: int, gen: Any) -> dict:
    given = torch.randn(5, generator=gen)
    tensor = given.clone().to(device)
    returned = comm.broadcast(tensor, src=1)
    return {"input": _host(given), "returned": _host(returned), "tensor": _host(tensor)}


def _run_barrier(comm: Communicator, device: torch.device, rank: int, gen: Any) -> dict:
    if rank == 1:
        time.sleep(BARRIER_DELAY_S)
    entered = time.time()
    comm.barrier()
    return {"entered": entered, "left": time.time()}


_RUN = {
    "all_reduce": _run_all_reduce,
    "all_gather": _run_all_gather,
    "broadcast": _run_broadcast,
    "barrier": _run_barrier,
}


def _close(a: list[Any], b: torch.Tensor) -> bool:
    got = torch.tensor(a)
    return got.shape == b.shape and torch.allclose(got, b, rtol=1e-6, atol=1e-6)


def _verify_all_reduce(per_rank: dict[int, dict[str, Any]]) -> None:
    total = sum(torch.tensor(per_rank[r]["input"]) for r in range(WORLD_SIZE))
    assert isinstance(total, torch.Tensor)
    for rank, got in sorted(per_rank.items()):
        if not _close(got["returned"], total):
            own = _close(got["returned"], torch.tensor(got["input"]))
            said = "its own input, unchanged" if own else "something else"
            raise CheckFailed(
                f"rank {rank}: all_reduce returned {said} ({_short(got['returned'])}); "
                f"expected the sum over the {WORLD_SIZE} ranks ({_short(total.tolist())})"
            )
        if not _close(got["tensor"], total):
            raise CheckFailed(
                f"rank {rank}: all_reduce returned the sum but left the tensor it was given "
                "unchanged; the contract reduces in place"
            )


def _verify_all_gather(per_rank: dict[int, dict[str, Any]]) -> None:
    parts = [torch.tensor(per_rank[r]["input"]) for r in range(WORLD_SIZE)]
    expected = torch.cat(parts, dim=1)
    for rank, got in sorted(per_rank.items()):
        if not _close(got["returned"], expected):
            raise CheckFailed(
                f"rank {rank}: all_gather(dim=1) returned {_short(got['returned'])}; expected "
                f"every rank's tensor concatenated in rank order ({_short(expected.tolist())})"
            )


def _verify_broadcast(per_rank: dict[int, dict[str, Any]]) -> None:
    expected = torch.tensor(per_rank[1]["input"])
    for rank, got in sorted(per_rank.items()):
        for key in ("returned", "tensor"):
            if not _close(got[key], expected):
                what = "returned" if key == "returned" else "left its tensor holding"
                raise CheckFailed(
                    f"rank {rank}: broadcast(src=1) {what} {_short(got[key])}; expected rank "
                    f"1's tensor {_short(expected.tolist())} (in place)"
                )


def _verify_barrier(per_rank: dict[int, dict[str, Any]]) -> None:
    late = per_rank[1]["entered"]
    early_left = per_rank[0]["left"]
    if early_left < late - 0.05:
        raise CheckFailed(
            f"rank 0 left the barrier {late - early_left:.2f} s before rank 1 entered it"
        )


_VERIFY = {
    "all_reduce": _verify_all_reduce,
    "all_gather": _verify_all_gather,
    "broadcast": _verify_broadcast,
    "barrier": _verify_barrier,
}


def _short(values: list[Any]) -> str:
    flat = torch.tensor(values).flatten().tolist()
    shown = ", ".join(f"{v:.3f}" for v in flat[:4])
    return f"[{shown}{', ...' if len(flat) > 4 else ''}]"
