"""Crash isolation: cases run one at a time in a worker process, spawned fresh.

The pytest process never imports torch or the backend; it sends cases down a pipe and gets
results back. A kernel that kills its process (a segfault, an abort, the OOM killer) or hangs
costs only the case it was running: that case is recorded "crashed", and the next case starts
a new worker. The worker's first act is loading the backend and timing its first probe(),
which the L0 checks judge.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from crossinfer_conformance.cases import Case
from crossinfer_conformance.info import SessionInfo
from crossinfer_conformance.outcome import CRASHED, FAILED, CaseResult, describe_exc

START_TIMEOUT_S = 300.0
"""Importing torch and a backend on a busy machine can take a while; this is plenty."""


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to open the backend; sent to each worker it spawns."""

    backend: str
    seed: int
    run_dir: str


class _Lost(Exception):  # noqa: N818 - "the worker was lost", carried up to one result
    """The worker died or timed out; the message says which."""


class Worker:
    """Runs cases in a child process, replacing the child after a crash or timeout."""

    def __init__(self, settings: WorkerSettings, case_timeout_s: float) -> None:
        self._settings = settings
        self._timeout = case_timeout_s
        self._process: Any = None
        self._conn: Connection | None = None
        self._info: SessionInfo | None = None

    def describe(self) -> SessionInfo:
        """The backend as the worker found it (starting the worker if none runs)."""
        if self._info is None:
            self._start()
        assert self._info is not None
        return self._info

    def run(self, case: Case) -> CaseResult:
        """Run one case; a crash or a timeout comes back as a "crashed" result."""
        start = time.monotonic()
        try:
            if self._conn is None:
                self._start()
            if self._info is not None and self._info.problem:
                return CaseResult(FAILED, f"the backend did not load again: {self._info.problem}")
            self._send(case)
            result = self._receive(self._timeout)
        except _Lost as lost:
            message = f"{lost} while running this case; a fresh worker runs the remaining cases"
            return CaseResult(CRASHED, message, time.monotonic() - start)
        return CaseResult(result.outcome, result.message, time.monotonic() - start)

    def close(self) -> None:
        """Ask the worker to finish, and make sure it has."""
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
        self._reap(grace_s=10.0)

    def _start(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        ours, theirs = spawn.Pipe()
        # Not a daemon: the L4 check starts rank processes of its own from the worker.
        self._process = spawn.Process(target=serve, args=(theirs, self._settings))
        self._process.start()
        theirs.close()
        self._conn = ours
        try:
            self._info = self._receive(START_TIMEOUT_S)
        except _Lost as lost:
            problem = f"the worker process could not load it: {lost}"
            self._info = SessionInfo(self._settings.backend, problem=problem)

    def _send(self, case: Case) -> None:
        assert self._conn is not None
        try:
            self._conn.send(case)
        except OSError:
            # The worker went away between cases (after answering the last one): the case
            # never started, so give it a fresh worker rather than a verdict.
            self._reap(grace_s=10.0)
            self._start()
            assert self._conn is not None
            self._conn.send(case)

    def _receive(self, timeout_s: float) -> Any:
        assert self._conn is not None
        if not self._conn.poll(timeout_s):
            self._reap(grace_s=0.0)
            raise _Lost(f"no answer within {timeout_s:.0f} s, so the worker was killed")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._reap(grace_s=10.0)
            raise _Lost(f"the worker process died ({_exit_text(code)})") from None

    def _reap(self, grace_s: float) -> int | None:
        process, self._process = self._process, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if process is None:
            return None
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()
        return int(process.exitcode) if process.exitcode is not None else None


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def serve(conn: Connection, settings: WorkerSettings) -> None:
    """The worker's main loop: describe the backend, then run cases until told to stop."""
    os.environ.setdefault("CROSSINFER_NO_PROGRESS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        from crossinfer_conformance.checks import run_case
        from crossinfer_conformance.context import open_context

        # The cases are tiny: a second thread only fights the other processes of the run
        # (L4 ranks, other suites) for the cores.
        torch.set_num_threads(1)
        ctx, info = open_context(settings.backend, settings.seed, Path(settings.run_dir))
    except Exception as exc:
        conn.send(SessionInfo(settings.backend, problem=f"loading it raised {describe_exc(exc)}"))
        return
    conn.send(info)
    if ctx is None:
        return
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        conn.send(run_case(ctx, case))
