"""The tpu backend passes the suite on XLA's CPU device (``crossinfer conformance --device tpu
--emulate``) in the compat environment (torch 2.8 + torch-xla 2.8.1, which ``make test``
creates as .venv-xla): the reference static-shape ops, the padded-batch runner, the warm-up
and the recompile check, with the Pallas kernel (TPU only) recorded not-supported."""

from __future__ import annotations

import pytest

from tests.conformance.runs import COMPAT_PYTHON, SuiteRuns

pytestmark = pytest.mark.slow

NOT_SUPPORTED = {
    # What only a TPU runs: the Pallas ragged paged attention kernel.
    "L2-native-attention-mixed-fp32-bs16-h64-gqa2",
    # Not declared: fp16, block sizes 1 and 8, head size 80.
    "L2-attention-mixed-fp16-bs16-h64-gqa1",
    "L2-attention-mixed-fp16-bs16-h64-gqa4",
    "L2-attention-mixed-fp32-bs1-h64-gqa2",
    "L2-attention-mixed-fp32-bs8-h64-gqa2",
    "L2-attention-mixed-fp32-bs16-h80-gqa2",
    "L2-write_kv-fp16-bs16-h64",
    "L2-write_kv-fp32-bs1-h64",
    "L2-write_kv-fp32-bs8-h128",
    "L2-copy_blocks-fp32-bs8-h128",
    # XLA's CPU device commits memory lazily: the release of a cache cannot be observed.
    "L3-free_memory",
}


def test_tpu_passes_emulated_on_the_xla_cpu_device(suite_runs: SuiteRuns) -> None:
    assert COMPAT_PYTHON.exists(), (
        f"{COMPAT_PYTHON} is missing: make test creates the torch-xla compat environment"
    )
    run = suite_runs.get("tpu-emulated")
    assert run.returncode == 0, run.output[-4000:]
    report = run.report
    assert (report["backend"], report["package"]) == ("tpu", "crossinfer-tpu")
    assert report["emulated"] and report["levels"] == "L0-L5"
    assert report["device"] == "XLA CPU device (emulated tpu)"
    assert report["torch_version"].startswith("2.8.")
    assert run.ids("not-supported") == NOT_SUPPORTED
    assert run.ids("passed") == set(run.outcomes()) - NOT_SUPPORTED
    assert len(run.ids("passed")) == 53
    for case in ("L2-static-padded-mixed-fp32-bs16-h64-gqa2", "L2-static-sink-mixed-fp32-bs16-h64",
                 "L5-static-no-recompile", "L4-all_reduce", "L5-engine-preemption"):  # fmt: skip
        assert case in run.ids("passed")
