"""schemathesis against the served /openapi.json: generated requests (valid ones, and ones
the schema says are invalid) to every operation find no 5xx, no response that breaks its
documented schema or media type, and no accepted request that the schema forbids.

schemathesis runs as its command-line tool in a subprocess (its pytest integration loads the
schema at import time, before any server exists), against a server on the shared engine with
tight limits so that no generated request can run long. positive_data_acceptance is left out
on purpose: a schema cannot say that prompt tokens plus max_tokens must fit the context, so
some schema-valid requests are rightly refused with a 400.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import MODEL
from tests.server.harness import serve_in_thread

pytestmark = pytest.mark.slow

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "unsupported_method",
    "allow_header_conformance",
]
MAX_EXAMPLES = 30  # per operation and phase; plus the coverage phase's boundary cases


@pytest.fixture(scope="module")
def url(server_engine: Any) -> Iterator[str]:
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings
    from crossinfer.server.limits import ServerLimits

    limits = ServerLimits(
        max_n=2, max_total_tokens=24, max_input_tokens=16, max_client_batch_size=4
    )
    settings = ServerSettings(served_model_name=MODEL, limits=limits)
    with serve_in_thread(build_app(server_engine, settings)) as base:
        yield base


def test_schemathesis_finds_nothing(url: str, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    command = [
        str(schemathesis),
        "run",
        f"{url}/openapi.json",
        "--checks", ",".join(CHECKS),
        "--mode", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261201",
        "--workers", "1",
        "--request-timeout", "60",
        "--suppress-health-check", "all",
        "--output-sanitize", "false",
        "--report", "junit",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    assert "No issues found" in result.stdout or " passed" in result.stdout, report
