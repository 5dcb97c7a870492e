"""The JSON report, its Markdown, and the matrix of a folder of reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossinfer import cli
from crossinfer_conformance.cases import Case
from crossinfer_conformance.info import SessionInfo
from crossinfer_conformance.outcome import CaseResult
from crossinfer_conformance.report import build_report, render_matrix, result_record, write_report

CASES = [Case("L0-entry-point", "L0", "entry_point"), Case("L4-barrier", "L4", "barrier")]


def _report(name: str, outcomes: list[CaseResult]) -> dict:
    info = SessionInfo(name, package=f"pkg-{name}", version="1.2", api_version="1.0",
                       devices=(f"{name}-dev0",))  # fmt: skip
    records = [result_record(c, r) for c, r in zip(CASES, outcomes, strict=True)]
    return build_report(info, records, seed=7, max_level="L4", emulate_requested=False)


def test_report_fields_and_markdown(tmp_path: Path) -> None:
    failed = CaseResult("failed", "rank 0 left | early", 0.25)
    report = _report("alpha", [CaseResult("passed"), failed])
    markdown = write_report(tmp_path / "alpha.json", report)
    data = json.loads((tmp_path / "alpha.json").read_text())
    assert {k: data[k] for k in ("backend", "package", "package_version", "device", "seed")} == {
        "backend": "alpha",
        "package": "pkg-alpha",
        "package_version": "1.2",
        "device": "alpha-dev0",
        "seed": 7,
    }
    assert data["summary"] == {"passed": 1, "failed": 1, "crashed": 0, "not-supported": 0}
    assert data["results"][1] == {
        "id": "L4-barrier",
        "level": "L4",
        "check": "barrier",
        "params": {},
        "outcome": "failed",
        "message": "rank 0 left | early",
        "duration_s": 0.25,
    }
    text = markdown.read_text()
    assert "| L4-barrier | **FAIL** |" in text
    assert "- **alpha** `L4-barrier` (failed): rank 0 left | early" in text


def test_matrix_puts_backends_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_report(
        tmp_path / "b.json", _report("beta", [CaseResult("passed"), CaseResult("crashed", "x")])
    )
    write_report(
        tmp_path / "a.json",
        _report("alpha", [CaseResult("not-supported", "no"), CaseResult("passed")]),
    )
    (tmp_path / "other.json").write_text('{"not": "a report"}')
    matrix = render_matrix(tmp_path).splitlines()
    assert "| check | alpha | beta |" in matrix
    assert "| L0-entry-point | n/s | pass |" in matrix
    assert "| L4-barrier | pass | **CRASH** |" in matrix
    assert cli.main(["conformance", "--matrix", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == matrix


def test_matrix_of_an_empty_folder_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["conformance", "--matrix", str(tmp_path)]) == 2
    assert "no crossinfer conformance reports" in capsys.readouterr().err
