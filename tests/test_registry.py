"""Backend discovery, ``--device`` resolution and ``crossinfer backends``.

Two kinds of tests. In-process ones build the entry points with stevedore's
``ExtensionManager.make_test_instance`` and check the rules. End-to-end ones install the
out-of-tree packages of tests/fixtures/ into a temporary folder once per session and run the
real command in a subprocess with that folder on PYTHONPATH, so discovery reads real
distribution metadata and really imports (or fails to import) the plugins.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from stevedore import ExtensionManager
from stevedore.extension import Extension

from crossinfer import cli
from crossinfer.backend import Probe
from crossinfer.backends_table import COLUMNS
from crossinfer.registry import (
    AUTO_ORDER,
    NAMESPACE,
    BackendInfo,
    DeviceError,
    describe_extension,
    discover,
    resolve_device,
)
from crossinfer_cpu import CpuBackend

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_PACKAGES = ("example_backend", "broken_backend", "absent_backend")


# -- in-process: the rules ------------------------------------------------------------------


def _backend_class(
    name: str, *, available: bool = True, priority: int = 0, api: tuple[int, int] = (1, 0)
) -> type[CpuBackend]:
    def probe(self: CpuBackend) -> Probe:
        if available:
            return Probe(True, devices=(f"{name}:0",))
        return Probe(False, f"no {name} device here; install the {name} driver")

    attrs = {"name": name, "priority": priority, "api_version": api, "probe": probe}
    return type(f"{name.title()}Backend", (CpuBackend,), attrs)


def _extension(name: str, plugin: Any) -> Extension[Any]:
    return Extension(name, EntryPoint(name, f"fake_{name}:Backend", NAMESPACE), plugin, None)


def _infos(*classes: type[CpuBackend]) -> list[BackendInfo]:
    extensions = [_extension(cls.name, cls) for cls in classes]
    return discover(ExtensionManager.make_test_instance(extensions, namespace=NAMESPACE))


def test_auto_prefers_cuda_over_cpu_when_available() -> None:
    infos = _infos(_backend_class("cpu"), _backend_class("cuda"))
    assert resolve_device("auto", infos).name == "cuda"


def test_auto_falls_back_to_cpu_when_cuda_is_unavailable() -> None:
    infos = _infos(_backend_class("cuda", available=False), _backend_class("cpu"))
    assert resolve_device("auto", infos).name == "cpu"


def test_auto_follows_the_builtin_order_and_rows_are_sorted_by_it() -> None:
    shuffled = ["cpu", "neuron", "rocm", "tpu", "xpu", "cuda"]
    infos = _infos(*[_backend_class(name, available=name != "cuda") for name in shuffled])
    assert [info.name for info in infos] == list(AUTO_ORDER)
    assert resolve_device("auto", infos).name == "rocm"


def test_auto_ranks_unlisted_backends_by_descending_priority() -> None:
    infos = _infos(
        _backend_class("alpha", priority=1),
        _backend_class("gamma", priority=9, available=False),
        _backend_class("beta", priority=5),
        _backend_class("cpu", available=False),
    )
    assert [info.name for info in infos] == ["cpu", "gamma", "beta", "alpha"]
    assert resolve_device("auto", infos).name == "beta"


def test_auto_takes_a_builtin_name_before_any_priority() -> None:
    infos = _infos(_backend_class("beta", priority=100), _backend_class("cpu"))
    assert resolve_device("auto", infos).name == "cpu"


def test_auto_with_nothing_available_names_every_reason() -> None:
    infos = _infos(_backend_class("cuda", available=False), _backend_class("cpu", available=False))
    with pytest.raises(DeviceError, match="--device auto found no available backend") as err:
        resolve_device("auto", infos)
    assert "cuda: no cuda device here; install the cuda driver" in str(err.value)
    assert "cpu: no cpu device here; install the cpu driver" in str(err.value)


def test_unknown_device_lists_the_known_names() -> None:
    infos = _infos(_backend_class("cpu"), _backend_class("cuda", available=False))
    with pytest.raises(DeviceError) as err:
        resolve_device("rocm", infos)
    assert str(err.value).startswith(
        "--device rocm: no backend of that name is installed; known: auto, cpu, cuda "
    )


def test_unavailable_device_carries_the_probe_reason() -> None:
    infos = _infos(_backend_class("cpu"), _backend_class("rocm", available=False))
    with pytest.raises(DeviceError) as err:
        resolve_device("rocm", infos)
    assert str(err.value) == (
        "--device rocm is not available: no rocm device here; install the rocm driver"
    )


def test_device_names_are_matched_ignoring_case_and_spaces() -> None:
    infos = _infos(_backend_class("cpu"))
    assert resolve_device(" CPU ", infos).name == "cpu"


def test_a_name_registered_twice_is_refused() -> None:
    infos = _infos(_backend_class("cpu"), _backend_class("cpu"))
    with pytest.raises(DeviceError, match="provided by several packages"):
        resolve_device("cpu", infos)


def test_other_major_version_is_refused_without_constructing_it() -> None:
    old = describe_extension(_extension("old", _backend_class("old", api=(0, 9))))
    assert (old.api, old.available, old.backend) == ("0.9", False, None)
    assert old.reason.startswith("api 0.9 is not compatible with this crossinfer (contract 1.3)")
    assert "upgrade the plugin" in old.reason


def test_newer_minor_version_is_compatible() -> None:
    newer = describe_extension(_extension("newer", _backend_class("newer", api=(1, 7))))
    assert (newer.api, newer.available) == ("1.7", True)


class _RaisingProbe(CpuBackend):
    name = "noisy"

    def probe(self) -> Probe:
        raise RuntimeError("driver went away")


class _RaisingInit(CpuBackend):
    name = "fragile"

    def __init__(self) -> None:
        raise OSError("cannot read /dev/fragile0")


@pytest.mark.parametrize(
    ("plugin", "reason_start"),
    [
        (_RaisingProbe, "probe() raised RuntimeError: driver went away; it must return Probe("),
        (_RaisingInit, "could not be constructed: OSError: cannot read /dev/fragile0; "),
        (object, "fake_odd:Backend is not a subclass of crossinfer.backend.Backend; "),
        (len, "fake_odd:Backend is not a subclass of crossinfer.backend.Backend; "),
    ],
    ids=["probe-raises", "init-raises", "not-a-backend", "not-a-class"],
)
def test_misbehaving_plugin_is_reported_not_raised(plugin: Any, reason_start: str) -> None:
    info = describe_extension(_extension("odd", plugin))
    assert info.available is False
    assert info.reason.startswith(reason_start), info.reason
    assert info.reason.endswith("this is a bug in the plugin; fix or uninstall it")


def test_discover_reads_installed_metadata_fresh_each_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stevedore's own caches would serve the first answer again: its class-level dict for the
    # life of the process, and its file cache because the rewrite keeps the file's mtime.
    dist_info = tmp_path / "crossinfer_late_backend-9.9.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: crossinfer-late-backend\nVersion: 9.9\n"
    )
    entry_points = dist_info / "entry_points.txt"
    entry_points.write_text(f"[{NAMESPACE}]\nlate = crossinfer_cpu:CpuBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    first = {info.name: info for info in discover()}
    assert (first["late"].package, first["late"].version) == ("crossinfer-late-backend", "9.9")
    mtime_ns = entry_points.stat().st_mtime_ns
    entry_points.write_text(f"[{NAMESPACE}]\nlater = crossinfer_cpu:CpuBackend\n")
    os.utime(entry_points, ns=(mtime_ns, mtime_ns))

    names = {info.name for info in discover()}
    assert "later" in names and "late" not in names


# -- in-process: the command ----------------------------------------------------------------


def test_backends_json_has_one_object_per_backend(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    infos = _infos(_backend_class("cpu"), _backend_class("cuda", available=False))
    monkeypatch.setattr(cli, "discover", lambda: infos)
    assert cli.main(["backends", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1] == {
        "name": "cpu",
        "package": "",
        "version": "",
        "api": "1.0",
        "available": True,
        "collectives": "gloo",
        "quantizations": ["int8"],
        "reason": "",
        "devices": ["cpu:0"],
    }
    assert rows[0]["reason"] == "no cuda device here; install the cuda driver"


def test_main_turns_a_device_error_into_exit_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse() -> list[BackendInfo]:
        raise DeviceError("--device rocm is not available: no HIP")

    monkeypatch.setattr(cli, "discover", refuse)
    assert cli.main(["backends"]) == 2
    assert capsys.readouterr().err == "crossinfer: error: --device rocm is not available: no HIP\n"


def test_main_without_a_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "backends" in capsys.readouterr().err


def test_device_argument_defaults_to_auto_and_names_the_order() -> None:
    parser = argparse.ArgumentParser()
    cli.add_device_argument(parser)
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", "rocm"]).device == "rocm"
    assert "cuda, rocm, xpu, tpu, neuron, cpu" in " ".join(parser.format_help().split())


# -- end to end: out-of-tree packages in a subprocess ---------------------------------------


@dataclass(frozen=True)
class _Child:
    """How to start a Python that sees the installed fixture packages."""

    env: dict[str, str]
    cwd: Path
    """An empty folder: the repository's own crossinfer.egg-info must not shadow the install."""

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], env=self.env, cwd=self.cwd, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="session")
def child(tmp_path_factory: pytest.TempPathFactory) -> _Child:
    """Install the fixture packages into a temporary folder, once per session."""
    root = tmp_path_factory.mktemp("backend_fixtures")
    # pip builds a local project inside its folder (build/, *.egg-info): build copies.
    sources = [shutil.copytree(FIXTURES / name, root / name) for name in FIXTURE_PACKAGES]
    target = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    offline = ["--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "--no-compile"]
    subprocess.run([*pip, *offline, "--target", str(target), *map(str, sources)], check=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    # Anything in the child still using stevedore's own cache must not touch the user's.
    env["XDG_CACHE_HOME"] = str(root / "cache")
    cwd = root / "cwd"
    cwd.mkdir()
    return _Child(env, cwd)


_CHILD_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json
    from crossinfer.cli import main
    from crossinfer.registry import DeviceError, resolve_device

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["backends", "--json"])
    resolved = {}
    for device in ["example", "auto", "nope", "absent", "broken", "future"]:
        try:
            resolved[device] = type(resolve_device(device)).__qualname__
        except DeviceError as exc:
            resolved[device] = "DeviceError: " + str(exc)
    print(json.dumps({"status": status, "rows": json.loads(out.getvalue()), "resolved": resolved}))
    """
)


@pytest.fixture(scope="session")
def child_report(child: _Child) -> dict[str, Any]:
    """``crossinfer backends --json`` and resolve_device answers from one child process."""
    report: dict[str, Any] = json.loads(child.run("-c", _CHILD_SCRIPT))
    assert report["status"] == 0
    return report


def _row(report: dict[str, Any], name: str) -> dict[str, Any]:
    rows = {row["name"]: row for row in report["rows"]}
    return rows[name]


def test_rows_come_in_auto_order(child_report: dict[str, Any]) -> None:
    names = [row["name"] for row in child_report["rows"]]
    # cuda, rocm, xpu, tpu and neuron are installed by make test; without their devices (or
    # torch-xla, torch-neuronx) they are listed, unavailable.
    assert names == [
        "cuda", "rocm", "xpu", "tpu", "neuron", "cpu", "absent", "broken", "example", "future"
    ]  # fmt: skip


def test_out_of_tree_example_is_listed_available(child_report: dict[str, Any]) -> None:
    assert _row(child_report, "example") == {
        "name": "example",
        "package": "crossinfer-example-backend",
        "version": "0.3.1",
        "api": "1.1",
        "available": True,
        "collectives": "gloo",
        "quantizations": ["int8"],  # inherited from CpuBackend
        "reason": "",
        "devices": ["example-device-0"],
    }


def test_cpu_is_still_listed_available(child_report: dict[str, Any]) -> None:
    cpu = _row(child_report, "cpu")
    assert (cpu["package"], cpu["api"], cpu["available"], cpu["reason"]) == (
        "crossinfer",
        "1.3",
        True,
        "",
    )


def test_import_failure_names_package_and_error(child_report: dict[str, Any]) -> None:
    broken = _row(child_report, "broken")
    assert (broken["package"], broken["version"], broken["api"]) == (
        "crossinfer-broken-backend",
        "0.0.1",
        "",
    )
    assert broken["available"] is False
    assert broken["reason"] == (
        "failed to import: ModuleNotFoundError: No module named "
        "'crossinfer_nonexistent_vendor_sdk'; reinstall crossinfer-broken-backend with its "
        "dependencies, or uninstall it"
    )


def test_future_api_names_both_versions(child_report: dict[str, Any]) -> None:
    future = _row(child_report, "future")
    assert (future["package"], future["api"], future["available"]) == (
        "crossinfer-broken-backend",
        "2.0",
        False,
    )
    assert future["reason"].startswith(
        "api 2.0 is not compatible with this crossinfer (contract 1.3); upgrade crossinfer"
    )


def test_resolve_device_in_child(child_report: dict[str, Any]) -> None:
    resolved = child_report["resolved"]
    assert resolved["example"] == "ExampleBackend"
    assert resolved["auto"] == "CpuBackend"
    assert resolved["nope"].startswith(
        "DeviceError: --device nope: no backend of that name is installed; "
        "known: auto, absent, broken, cpu, cuda, example, future, neuron, rocm, tpu, xpu "
    )
    assert resolved["absent"] == (
        "DeviceError: --device absent is not available: "
        "the absent SDK is not installed; pip install absent-sdk"
    )
    assert resolved["broken"].startswith(
        "DeviceError: --device broken is not available: failed to import: ModuleNotFoundError"
    )
    assert resolved["future"].startswith("DeviceError: --device future is not available: api 2.0")


def test_backends_command_prints_an_aligned_table(child: _Child) -> None:
    lines = child.run("-m", "crossinfer.cli", "backends").splitlines()
    header = lines[0]
    assert header.split() == [
        "name", "package", "version", "api", "available", "collectives", "quantizations",
        "reason", "devices",
    ]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == [
        "absent", "broken", "cpu", "cuda", "example", "future", "neuron", "rocm", "tpu", "xpu"
    ]  # fmt: skip
    assert rows["example"].split() == [
        "example",
        "crossinfer-example-backend",
        "0.3.1",
        "1.1",
        "yes",
        "gloo",
        "int8",
        "-",
        "example-device-0",
    ]
    assert rows["broken"].split()[1:8] == [
        "crossinfer-broken-backend",
        "0.0.1",
        "-",
        "no",
        "-",
        "-",
        "failed",
    ]
    assert rows["cuda"].split()[5] == "nccl" and rows["neuron"].split()[5] == "xla"
    assert rows["cpu"].split()[6] == "int8" and rows["cuda"].split()[6] == "-"
    for column in COLUMNS[1:]:
        start = header.index(" " + column) + 1
        # Every cell of the column starts where its heading does, after a gap of spaces.
        assert all(line[start - 2 : start] == "  " != line[start] for line in lines), column
