"""Running the conformance suite the way a vendor would, in subprocesses.

The faulty backends of tests/fixtures/faulty_backends/ are installed into a temporary folder
(never the project's virtualenv) and seen through PYTHONPATH. Each backend's suite runs once
per session, several at a time in the background, from an empty folder (the repository's own
crossinfer.egg-info must not shadow the installed metadata); tests wait for the run they read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parents[1] / "fixtures"
PARALLEL_RUNS = 3
"""Each run is mostly one process importing torch at a time; three keep two cores busy."""
RUN_TIMEOUT_S = 1200
EMULATED = "-emulated"
"""Suffix of a run name that asks for ``--emulate`` (``cuda-emulated``)."""
COMPAT_PYTHON = Path(__file__).parents[2] / ".venv-xla" / "bin" / "python"
"""The compat environment's interpreter (torch 2.8 + torch-xla 2.8.1, made by make test):
the backends on torch-xla run their suite there."""
COMPAT_BACKENDS = frozenset({"tpu", "neuron"})


@dataclass(frozen=True)
class SuiteRun:
    """One finished run of the suite: its exit status, its output and its JSON report."""

    returncode: int
    output: str
    report: dict[str, Any]

    def outcomes(self) -> dict[str, str]:
        """Case id -> outcome."""
        return {r["id"]: r["outcome"] for r in self.report["results"]}

    def message(self, case_id: str) -> str:
        return next(r["message"] for r in self.report["results"] if r["id"] == case_id)

    def ids(self, outcome: str) -> set[str]:
        return {case_id for case_id, got in self.outcomes().items() if got == outcome}


def suite_command(name: str, report: Path) -> list[str]:
    """cpu and the emulated GPU backends (``cuda-emulated``) go through ``crossinfer
    conformance`` (the CLI and the runner); the faulty backends through
    ``pytest --pyargs crossinfer_conformance --backend NAME``."""
    emulated = name.endswith(EMULATED)
    if name == "cpu" or emulated:
        device = name.removesuffix(EMULATED)
        python = str(COMPAT_PYTHON) if device in COMPAT_BACKENDS else sys.executable
        cli = [python, "-m", "crossinfer.cli", "conformance", "--device", device]
        return [*cli, *(["--emulate"] if emulated else []), "--report", str(report)]
    # The crash fixture only crashes in attention: its kernel levels are enough.
    level = "L2" if name == "faulty_crash" else "L5"
    pytest_args = ["-p", "no:cacheprovider", "-q", "--pyargs", "crossinfer_conformance"]
    return [sys.executable, "-m", "pytest", *pytest_args, "--backend", name, "--level", level,
            "--report", str(report)]  # fmt: skip


class SuiteRuns:
    """Starts suite runs in the background and hands each one out when it is done."""

    def __init__(self, env: dict[str, str], cwd: Path, reports: Path) -> None:
        self.env, self.cwd, self.reports = env, cwd, reports
        self._pool = ThreadPoolExecutor(max_workers=PARALLEL_RUNS)
        self._runs: dict[str, Future[SuiteRun]] = {}

    def start(self, name: str) -> None:
        if name not in self._runs:
            self._runs[name] = self._pool.submit(self._run, name)

    def get(self, name: str) -> SuiteRun:
        self.start(name)
        return self._runs[name].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, name: str) -> SuiteRun:
        report = self.reports / f"{name}.json"
        done = subprocess.run(
            suite_command(name, report),
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        output = done.stdout + done.stderr
        assert report.exists(), f"{name}: no report was written\n{output[-4000:]}"
        return SuiteRun(done.returncode, output, json.loads(report.read_text()))


def install_fixtures(root: Path) -> Path:
    """pip install the faulty backends into ``root``/site; returns that folder."""
    source = shutil.copytree(FIXTURES / "faulty_backends", root / "faulty_backends")
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    offline = ["--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "--no-compile"]
    subprocess.run([*pip, *offline, "--target", str(target), str(source)], check=True)
    return target
