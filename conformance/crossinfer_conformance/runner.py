"""Running the suite from Python or from ``crossinfer conformance``: pytest.main with the
plugin, isolated from whatever pytest configuration the current folder has."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import crossinfer_conformance
from crossinfer_conformance import EMULATE_ENV, LEVELS

PLUGIN_MODULE = "crossinfer_conformance.plugin"


@contextlib.contextmanager
def emulation(enabled: bool) -> Iterator[None]:
    """Set ``CROSSINFER_EMULATE=1`` for the block when ``enabled``; restore it after."""
    saved = os.environ.get(EMULATE_ENV)
    if enabled:
        os.environ[EMULATE_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(EMULATE_ENV, None)
        else:
            os.environ[EMULATE_ENV] = saved


def resolve_backend_name(device: str, emulate: bool = False) -> str:
    """The backend ``--device`` names (``auto`` included), checked available now; raises
    crossinfer.registry.DeviceError with the probe's reason otherwise."""
    from crossinfer.registry import resolve_device

    with emulation(emulate):
        return resolve_device(device).name


def default_report_path(backend: str) -> Path:
    """Where ``crossinfer conformance`` writes its report unless told: the current folder."""
    return Path(f"conformance-{backend}.json")


def run_conformance(
    backend: str,
    emulate: bool = False,
    level: str = LEVELS[-1],
    report: str | Path | None = None,
    seed: int = 0,
    keyword: str | None = None,
    extra_args: Sequence[str] = (),
) -> int:
    """Run the suite on ``backend`` (levels L0 up to ``level``); returns pytest's exit code
    (0: every case passed or is not supported)."""
    package_dir = Path(crossinfer_conformance.__file__).parent
    args = [
        # Ignore the pytest configuration of the folder we happen to be in.
        "-c",
        os.devnull,
        "--rootdir",
        str(package_dir.parent),
        "-p",
        "no:cacheprovider",
        "-v",
        "--pyargs",
        "crossinfer_conformance",
        "--backend",
        backend,
        "--level",
        level,
        "--conformance-seed",
        str(seed),
    ]
    if not _plugin_autoloaded():
        args[:0] = ["-p", PLUGIN_MODULE]
    if emulate:
        args.append("--emulate")
    if report is not None:
        args += ["--report", str(report)]
    if keyword:
        args += ["-k", keyword]
    return int(pytest.main([*args, *extra_args]))


def _plugin_autoloaded() -> bool:
    # Registered by the pytest11 entry point unless autoloading is off; loading it a second
    # time with -p would make pytest refuse the duplicate.
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    entry_points = importlib.metadata.entry_points(group="pytest11")
    return any(ep.value == PLUGIN_MODULE for ep in entry_points)
