"""The pytest plugin: ``pytest --pyargs crossinfer_conformance --backend NAME``.

Registered through the ``pytest11`` entry point, so its options exist in every pytest run;
they are inert unless ``--backend`` is given. Collecting the crossinfer_conformance package
then turns its ``cases.py`` into one test item per case (the item's name is the case id, so
``-k`` filters cases). Items send their case to a :class:`~crossinfer_conformance.worker.Worker`
and turn its result into a pytest outcome: passed, failed (crashed included) or skipped
("not supported", with the reason). This process imports neither torch nor the backend.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crossinfer_conformance import EMULATE_ENV, LEVELS
from crossinfer_conformance.cases import Case, build_cases, unsupported_reason
from crossinfer_conformance.info import SessionInfo
from crossinfer_conformance.outcome import (
    FAILED,
    NOT_SUPPORTED,
    PASSED,
    CaseResult,
)
from crossinfer_conformance.report import build_report, result_record, write_report
from crossinfer_conformance.worker import Worker, WorkerSettings

SUITE_FILE = Path(__file__).with_name("cases.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    """The suite's options; nothing happens with them unless --backend is given."""
    group = parser.getgroup(
        "crossinfer-conformance", "crossinfer conformance (pytest --pyargs crossinfer_conformance)"
    )
    group.addoption("--backend", metavar="NAME", help="backend entry-point name to check")
    group.addoption(
        "--emulate",
        action="store_true",
        help=f"set {EMULATE_ENV}=1 so a backend that can emulate its device does",
    )
    group.addoption(
        "--level",
        default=LEVELS[-1],
        choices=LEVELS,
        help="run the levels from L0 up to this one (default: L5, all)",
    )
    group.addoption(
        "--report", metavar="PATH", help="write the JSON report here, its Markdown beside it (.md)"
    )
    group.addoption(
        "--conformance-seed", type=int, default=0, help="seed of every random input (default 0)"
    )
    group.addoption(
        "--conformance-timeout",
        type=float,
        default=600.0,
        help="seconds one case may run before it counts as crashed (default 600)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """With --backend, register the run that owns the worker and the report."""
    if config.getoption("backend"):
        config.pluginmanager.register(ConformanceRun(config), ConformanceRun.PLUGIN_NAME)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """The package's cases.py is the suite; no other file is ours."""
    if file_path.name == SUITE_FILE.name and file_path.resolve() == SUITE_FILE.resolve():
        return SuiteFile.from_parent(parent, path=file_path)
    return None


def _run(config: pytest.Config) -> ConformanceRun | None:
    plugin = config.pluginmanager.get_plugin(ConformanceRun.PLUGIN_NAME)
    return plugin if isinstance(plugin, ConformanceRun) else None


class SuiteFile(pytest.File):
    """Collects one item per case, for the backend under test."""

    def collect(self) -> Iterator[pytest.Item]:
        run = _run(self.config)
        if run is None:
            raise self.CollectError(
                "the crossinfer conformance suite needs --backend NAME "
                "(`crossinfer backends` lists the names)"
            )
        info = run.info()
        if info.problem or info.caps is None:
            raise self.CollectError(f"--backend {run.backend}: {info.problem}")
        for case in build_cases(info.caps, run.level):
            item = CaseItem.from_parent(self, name=case.id, case=case)
            reason = unsupported_reason(case, info.caps)
            if reason:
                item.unsupported = reason
                item.add_marker(pytest.mark.skip(reason=f"not supported: {reason}"))
            yield item


class CaseFailure(Exception):
    """Carries a failed or crashed result to pytest's report."""


class CaseItem(pytest.Item):
    """One case; it runs in the worker."""

    def __init__(self, *, case: Case, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.unsupported = ""
        self.result: CaseResult | None = None

    def runtest(self) -> None:
        run = _run(self.config)
        assert run is not None
        self.result = run.worker.run(self.case)
        if self.result.outcome == PASSED:
            return
        if self.result.outcome == NOT_SUPPORTED:
            pytest.skip(f"not supported: {self.result.message}")
        raise CaseFailure(f"{self.case.id} {self.result.outcome}: {self.result.message}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CaseFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        # A line number is required: pytest reports a skip marker at the item's location.
        return self.path, 0, self.case.id


class ConformanceRun:
    """The state of one run: options, the worker, the results, the report."""

    PLUGIN_NAME = "crossinfer-conformance-run"

    def __init__(self, config: pytest.Config) -> None:
        self.backend: str = config.getoption("backend")
        self.level: str = config.getoption("level")
        self.seed: int = config.getoption("conformance_seed")
        self.emulate: bool = config.getoption("emulate")
        report = config.getoption("report")
        self.report_path = Path(report).resolve() if report else None
        self.records: list[dict[str, Any]] = []
        self._info: SessionInfo | None = None
        self._saved_env = os.environ.get(EMULATE_ENV)
        if self.emulate:
            # Before any backend is constructed, in this process and every one it spawns.
            os.environ[EMULATE_ENV] = "1"
        self._run_dir = tempfile.mkdtemp(prefix="crossinfer-conformance-")
        settings = WorkerSettings(self.backend, self.seed, self._run_dir)
        self.worker = Worker(settings, config.getoption("conformance_timeout"))

    def info(self) -> SessionInfo:
        """The backend under test, as the worker loaded it (starts the worker)."""
        if self._info is None:
            self._info = self.worker.describe()
        return self._info

    def pytest_report_header(self, config: pytest.Config) -> str:
        emulate = f", {EMULATE_ENV}=1" if self.emulate else ""
        return (
            f"crossinfer conformance: backend {self.backend}, levels L0-{self.level}, "
            f"seed {self.seed}{emulate}"
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if isinstance(item, CaseItem):
            result = _result_of(item, report)
            if result is not None:
                self.records.append(result_record(item.case, result))
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.worker.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)
        if self.report_path is not None and self._info is not None and self.records:
            report = build_report(self._info, self.records, self.seed, self.level, self.emulate)
            write_report(self.report_path, report)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self._info is None or self._info.problem:
            return
        info = self._info
        mode = "emulated" if info.caps and info.caps.emulated else "real"
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
        summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "no cases"
        device = ", ".join(info.devices) or "?"
        line = (
            f"crossinfer conformance: {info.name} ({info.package} {info.version}, api "
            f"{info.api_version}) on {device} [{mode}], seed {self.seed}: {summary}"
        )
        terminalreporter.write_line(line)
        if self.report_path is not None and self.records:
            terminalreporter.write_line(
                f"report: {self.report_path} (Markdown: {self.report_path.with_suffix('.md')})"
            )

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._saved_env is None:
            os.environ.pop(EMULATE_ENV, None)
        else:
            os.environ[EMULATE_ENV] = self._saved_env


def _result_of(item: CaseItem, report: pytest.TestReport) -> CaseResult | None:
    """The case's result once per item: from the worker, or from how pytest saw it."""
    if report.when == "setup":
        if report.skipped:
            return CaseResult(NOT_SUPPORTED, item.unsupported or _skip_reason(report))
        if report.failed:
            return CaseResult(FAILED, report.longreprtext)
        return None
    if report.when != "call":
        return None
    if item.result is not None:
        return item.result
    return CaseResult(FAILED, report.longreprtext or "the case did not run to the end")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)
