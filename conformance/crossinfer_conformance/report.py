"""The report: JSON per run, a Markdown rendering beside it, and the matrix of many runs.

JSON fields: ``format``, ``backend``, ``package``, ``package_version``, ``api_version``,
``contract_version``, ``device`` (and every probed ``devices``), ``emulated`` (from the
backend's Capabilities), ``emulate_requested``, ``seed``, ``levels``, ``crossinfer_version``,
``torch_version``, ``created``, ``summary`` (count per outcome) and ``results``: one object
per case with ``id``, ``level``, ``check``, ``params``, ``outcome`` (passed, failed, crashed,
not-supported), ``message`` and ``duration_s``. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crossinfer_conformance import LEVELS
from crossinfer_conformance.cases import Case
from crossinfer_conformance.info import SessionInfo
from crossinfer_conformance.outcome import OUTCOMES, CaseResult

FORMAT = "crossinfer-conformance/1"
MARKS = {"passed": "pass", "failed": "**FAIL**", "crashed": "**CRASH**", "not-supported": "n/s"}


def result_record(case: Case, result: CaseResult) -> dict[str, Any]:
    """One case's entry in ``results``."""
    return {
        "id": case.id,
        "level": case.level,
        "check": case.check,
        "params": case.params(),
        "outcome": result.outcome,
        "message": result.message,
        "duration_s": round(result.duration_s, 3),
    }


def build_report(
    info: SessionInfo,
    records: list[dict[str, Any]],
    seed: int,
    max_level: str,
    emulate_requested: bool,
) -> dict[str, Any]:
    """The JSON-ready report of one run."""
    summary = {outcome: 0 for outcome in OUTCOMES}
    for record in records:
        summary[record["outcome"]] += 1
    return {
        "format": FORMAT,
        "backend": info.name,
        "package": info.package,
        "package_version": info.version,
        "api_version": info.api_version,
        "contract_version": info.contract_version,
        "device": info.devices[0] if info.devices else "",
        "devices": list(info.devices),
        "emulated": bool(info.caps and info.caps.emulated),
        "emulate_requested": emulate_requested,
        "seed": seed,
        "levels": f"L0-{max_level}",
        "crossinfer_version": info.crossinfer_version,
        "torch_version": info.torch_version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
        "results": records,
    }


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write the JSON to ``path`` and its Markdown beside it; returns the Markdown's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    markdown = path.with_suffix(".md")
    markdown.write_text(render_reports([report]))
    return markdown


def load_reports(folder: Path) -> list[dict[str, Any]]:
    """Every conformance report (by its ``format``) among the JSON files in ``folder``."""
    reports = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == FORMAT:
            reports.append(data)
    return reports


def render_matrix(folder: Path | str) -> str:
    """Markdown: the backends of every report in ``folder``, then checks x backends."""
    reports = load_reports(Path(folder))
    if not reports:
        raise ValueError(f"{folder}: no crossinfer conformance reports (*.json) in this folder")
    return render_reports(sorted(reports, key=lambda r: (r["backend"], r["created"])))


def render_reports(reports: list[dict[str, Any]]) -> str:
    """Markdown for one report or many: who was tested, the matrix, then every failure."""
    lines = ["# crossinfer conformance", "", *_backends_table(reports), ""]
    lines += ["## Checks", "", *_matrix(reports), ""]
    failures = list(_failures(reports))
    if failures:
        lines += ["## Failures", "", *failures]
    return "\n".join(lines).rstrip() + "\n"


def _backends_table(reports: list[dict[str, Any]]) -> list[str]:
    head = "| backend | package | api | device | mode | seed | levels | "
    head += " | ".join(OUTCOMES) + " |"
    rows = [head, "|" + "---|" * (7 + len(OUTCOMES))]
    for r in reports:
        mode = "emulated" if r["emulated"] else "real"
        counts = " | ".join(str(r["summary"].get(o, 0)) for o in OUTCOMES)
        package = f"{r['package']} {r['package_version']}".strip()
        rows.append(
            f"| {r['backend']} | {package} | {r['api_version']} | {_cell(r['device'])} | "
            f"{mode} | {r['seed']} | {r['levels']} | {counts} |"
        )
    return rows


def _matrix(reports: list[dict[str, Any]]) -> list[str]:
    columns = [_column_name(r, reports) for r in reports]
    rows = ["| check | " + " | ".join(columns) + " |", "|---|" + "---|" * len(reports)]
    outcomes = [{res["id"]: res["outcome"] for res in r["results"]} for r in reports]
    for case_id in _case_ids(reports):
        cells = [MARKS.get(o.get(case_id, ""), "-") for o in outcomes]
        rows.append(f"| {case_id} | " + " | ".join(cells) + " |")
    return rows


def _column_name(report: dict[str, Any], reports: list[dict[str, Any]]) -> str:
    name = str(report["backend"])
    same = [r for r in reports if r["backend"] == name]
    if len(same) > 1:
        name += f" ({report['created']})"
    return name + (" (emulated)" if report["emulated"] else "")


def _case_ids(reports: Iterable[dict[str, Any]]) -> list[str]:
    # Level order first, then the order the suite ran them in.
    seen: dict[str, tuple[int, int]] = {}
    for report in reports:
        for index, res in enumerate(report["results"]):
            level = LEVELS.index(res["level"]) if res["level"] in LEVELS else len(LEVELS)
            seen.setdefault(res["id"], (level, index))
    return sorted(seen, key=lambda case_id: seen[case_id])


def _failures(reports: list[dict[str, Any]]) -> Iterable[str]:
    for report in reports:
        for res in report["results"]:
            if res["outcome"] in ("failed", "crashed"):
                where = f"**{report['backend']}** `{res['id']}`"
                yield f"- {where} ({res['outcome']}): {res['message']}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|") or "-"
