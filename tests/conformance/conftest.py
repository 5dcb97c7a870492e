"""The session's suite runs (see runs.py), started as soon as the selected tests need them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.runs import SuiteRuns, install_fixtures


@pytest.fixture(scope="session")
def suite_runs(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[SuiteRuns]:
    """The suite runs of this session; those the selected tests need start at once."""
    root = tmp_path_factory.mktemp("conformance")
    env = dict(os.environ, PYTHONPATH=str(install_fixtures(root)))
    env["XDG_CACHE_HOME"] = str(root / "cache")
    (root / "cwd").mkdir()
    (root / "reports").mkdir()
    runs = SuiteRuns(env, root / "cwd", root / "reports")
    here = Path(__file__).parent
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if here in item.path.parents and callspec is not None and "backend" in callspec.params:
            runs.start(callspec.params["backend"])
    yield runs
    runs.close()
