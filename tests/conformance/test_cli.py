"""``crossinfer conformance``: arguments, failing fast, and the emulation switch."""

from __future__ import annotations

import os

import pytest

from crossinfer import cli
from crossinfer_conformance import EMULATE_ENV
from crossinfer_conformance.runner import default_report_path, emulation


def test_an_unknown_device_fails_before_any_case_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["conformance", "--device", "nope", "--level", "L0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossinfer: error: --device nope: no backend of that name is installed")


def test_arguments_and_defaults() -> None:
    args = cli.build_parser().parse_args(["conformance", "--device", "cpu"])
    assert (args.device, args.emulate, args.level, args.report, args.seed, args.matrix) == (
        "cpu",
        False,
        "L5",
        None,
        0,
        None,
    )
    assert str(default_report_path("cpu")) == "conformance-cpu.json"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["conformance", "--level", "L6"])


def test_emulation_sets_the_variable_only_for_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    with emulation(True):
        assert os.environ[EMULATE_ENV] == "1"
    assert EMULATE_ENV not in os.environ
    monkeypatch.setenv(EMULATE_ENV, "0")
    with emulation(False):
        assert os.environ[EMULATE_ENV] == "0"
    assert os.environ[EMULATE_ENV] == "0"
