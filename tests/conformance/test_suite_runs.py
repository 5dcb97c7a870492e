"""The suite end to end: the CPU reference passes every level, and each planted fault fails
exactly the cases that exercise it, with a message that points at it."""

from __future__ import annotations

from collections import Counter

import pytest

from crossinfer import cli
from tests.conformance.runs import SuiteRun, SuiteRuns

pytestmark = pytest.mark.slow

L5 = {"L5-engine-greedy", "L5-engine-prefix-cache", "L5-engine-preemption"}
FAULTS = ["faulty_last_token", "faulty_write_kv", "faulty_probe", "faulty_allreduce"]
# For compiled-graph backends only: every dynamic backend records them not-supported.
STATIC = {
    "L2-static-padded-mixed-fp32-bs16-h64-gqa2",
    "L2-static-sink-mixed-fp32-bs16-h64",
    "L5-static-no-recompile",
}
NATIVE = "L2-native-attention-mixed-fp32-bs16-h64-gqa2"


def _finished(run: SuiteRun, expect_failures: bool) -> None:
    assert run.returncode == (1 if expect_failures else 0), run.output[-4000:]
    # Every fixture advertises what the CPU does; all are dynamic backends.
    assert run.ids("not-supported") == STATIC


@pytest.mark.parametrize("backend", ["cpu"])
def test_cpu_passes_every_level(suite_runs: SuiteRuns, backend: str) -> None:
    run = suite_runs.get(backend)
    _finished(run, expect_failures=False)
    report = run.report
    assert run.ids("passed") == set(run.outcomes()) - STATIC, run.output[-4000:]
    levels = Counter(r["level"] for r in report["results"])
    assert levels == {"L0": 4, "L1": 19, "L2": 36, "L3": 4, "L4": 4, "L5": 4}
    assert (report["backend"], report["package"], report["api_version"]) == (
        "cpu",
        "crossinfer",
        "1.3",
    )
    assert (report["emulated"], report["emulate_requested"], report["seed"]) == (False, False, 0)
    assert report["device"] and report["levels"] == "L0-L5"
    assert report["summary"] == {"passed": 68, "failed": 0, "crashed": 0, "not-supported": 3}
    assert "L2-attention-mixed-fp32-bs16-h64-gqa4" in run.outcomes()


@pytest.mark.parametrize("backend", ["faulty_last_token"])
def test_attention_ignoring_the_last_token(suite_runs: SuiteRuns, backend: str) -> None:
    run = suite_runs.get(backend)
    _finished(run, expect_failures=True)
    attention = {r["id"] for r in run.report["results"] if r["check"] == "attention"}
    assert len(attention) == 15 + 25  # L1: 3 dtypes, 6 block sizes, 6 head sizes; L2: 25
    assert run.ids("failed") == attention | L5 | {NATIVE}
    for case_id in attention:
        assert "each is the last token of its sequence" in run.message(case_id), case_id
    assert run.message("L2-attention-decode-fp32-bs16-h64-gqa1").endswith(
        "seq 0 pos 0 (last), seq 1 pos 5 (last), seq 2 pos 16 (last), seq 3 pos 40 (last) "
        "-- each is the last token of its sequence (4 of 4)"
    )
    for case_id in L5:
        assert run.message(case_id).startswith("greedy tokens differ from the CPU backend's")


@pytest.mark.parametrize("backend", ["faulty_write_kv"])
def test_write_kv_spilling_into_the_next_block(suite_runs: SuiteRuns, backend: str) -> None:
    run = suite_runs.get(backend)
    _finished(run, expect_failures=True)
    writes = {f"L1-kv-dtype-{d}" for d in ("fp32", "bf16", "fp16")}
    writes |= {f"L2-write_kv-{d}-bs16-h64" for d in ("fp32", "bf16", "fp16")}
    writes |= {"L2-write_kv-fp32-bs1-h64", "L2-write_kv-fp32-bs8-h128"}
    # Attention and copy_blocks are judged on what the cache holds, so only the write cases
    # and the engine (whose requests' blocks get overwritten) fail.
    assert run.ids("failed") == writes | L5
    assert run.message("L2-write_kv-fp32-bs16-h64") == (
        "write_kv changed 22 slots it was not given: block 3 slots 0-15 (all of it), right "
        "after written block 2; block 6 slots 0-4, right after written block 5; block 8 slot 8, "
        "right after written block 7"
    )


@pytest.mark.parametrize("backend", ["faulty_probe"])
def test_probe_that_says_available_without_a_device(suite_runs: SuiteRuns, backend: str) -> None:
    run = suite_runs.get(backend)
    _finished(run, expect_failures=True)
    # Nothing that needs the device can pass; what does not need it does.
    assert run.ids("passed") == {
        "L0-entry-point",
        "L0-api-version",
        "L0-probe-cheap",
        "L1-capabilities",
    }
    assert len(run.ids("failed")) == 64
    assert run.message("L0-probe-honest").startswith(
        "probe() says available (devices: faulty-device-0) but the device is not usable: "
        "backend.device() raised RuntimeError: faulty_probe: no device answers"
    )
    assert run.message("L0-probe-honest").endswith("probe() must return Probe(False, reason)")
    for case_id in run.ids("failed"):
        assert "faulty_probe: no device answers" in run.message(case_id), case_id


@pytest.mark.parametrize("backend", ["faulty_allreduce"])
def test_all_reduce_returning_the_local_tensor(suite_runs: SuiteRuns, backend: str) -> None:
    run = suite_runs.get(backend)
    _finished(run, expect_failures=True)
    assert run.ids("failed") == {"L4-all_reduce"}
    assert run.message("L4-all_reduce").startswith(
        "rank 0: all_reduce returned its own input, unchanged ("
    )
    assert "expected the sum over the 2 ranks" in run.message("L4-all_reduce")


@pytest.mark.parametrize("backend", ["faulty_crash"])
def test_a_crashing_kernel_costs_only_its_cases(suite_runs: SuiteRuns, backend: str) -> None:
    run = suite_runs.get(backend)
    assert run.returncode == 1, run.output[-4000:]
    crashed = {"L1-head-size-128", "L2-attention-mixed-fp32-bs16-h128-gqa2"}
    assert run.ids("crashed") == crashed
    static = STATIC - {"L5-static-no-recompile"}  # L0-L2 only
    assert set(run.outcomes()) - crashed - static == run.ids("passed")
    assert run.report["levels"] == "L0-L2" and len(run.outcomes()) == 59
    for case_id in crashed:
        assert run.message(case_id) == (
            "the worker process died (killed by signal 9, SIGKILL) while running this case; "
            "a fresh worker runs the remaining cases"
        )


def test_matrix_of_every_report(suite_runs: SuiteRuns, capsys: pytest.CaptureFixture[str]) -> None:
    emulated = ["cuda-emulated", "neuron-emulated", "rocm-emulated", "tpu-emulated", "xpu-emulated"]
    for name in ["cpu", "faulty_crash", *FAULTS, *emulated]:
        suite_runs.get(name)
    assert cli.main(["conformance", "--matrix", str(suite_runs.reports)]) == 0
    lines = capsys.readouterr().out.splitlines()
    columns = ["check", "cpu", "cuda (emulated)", "faulty_allreduce", "faulty_crash",
               "faulty_last_token", "faulty_probe", "faulty_write_kv", "neuron (emulated)",
               "rocm (emulated)", "tpu (emulated)", "xpu (emulated)"]  # fmt: skip
    assert _row(columns) in lines
    cells = ["pass", "pass", "**FAIL**", "-", "pass", "**FAIL**", "pass", "pass", "pass", "pass",
             "pass"]  # fmt: skip
    assert _row(["L4-all_reduce", *cells]) in lines
    cells = ["pass", "pass", "pass", "**CRASH**", "**FAIL**", "**FAIL**", "pass", "pass", "pass",
             "pass", "pass"]  # fmt: skip
    assert _row(["L2-attention-mixed-fp32-bs16-h128-gqa2", *cells]) in lines
    row = next(line for line in lines if line.startswith("| L2-write_kv-fp32-bs1-h64 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # cuda (emulated) declares block size 1; neuron, rocm, tpu and xpu (emulated) do not.
    assert (cells[2], *cells[-4:]) == ("pass", "n/s", "n/s", "n/s", "n/s")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
