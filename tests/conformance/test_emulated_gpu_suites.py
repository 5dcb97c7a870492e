"""The cuda, rocm and xpu backends pass the suite with their Triton kernels, tiles and
capabilities under Triton's interpreter on this CPU (``crossinfer conformance --device cuda
--emulate``), and the report says emulated. Block sizes the rocm and xpu backends do not
declare (1 and 8: they take multiples of 16) are recorded not-supported."""

from __future__ import annotations

import pytest

from tests.conformance.runs import SuiteRuns

pytestmark = pytest.mark.slow

BELOW_16 = {
    "L2-attention-mixed-fp32-bs1-h64-gqa2",
    "L2-attention-mixed-fp32-bs8-h64-gqa2",
    "L2-write_kv-fp32-bs1-h64",
    "L2-write_kv-fp32-bs8-h128",
    "L2-copy_blocks-fp32-bs8-h128",
}


@pytest.mark.parametrize("backend", ["cuda-emulated", "rocm-emulated", "xpu-emulated"])
def test_gpu_backend_passes_emulated(suite_runs: SuiteRuns, backend: str) -> None:
    run = suite_runs.get(backend)
    name = backend.removesuffix("-emulated")
    assert run.returncode == 0, run.output[-4000:]
    report = run.report
    assert (report["backend"], report["package"]) == (name, f"crossinfer-{name}")
    assert report["emulated"] and report["emulate_requested"]
    assert "Triton interpreter on" in report["device"] and "(emulated" in report["device"]
    assert report["levels"] == "L0-L5"
    static = {"L2-static-padded-mixed-fp32-bs16-h64-gqa2", "L2-static-sink-mixed-fp32-bs16-h64",
              "L5-static-no-recompile"}  # fmt: skip
    expected_skips = (BELOW_16 if name in ("rocm", "xpu") else set()) | static
    assert run.ids("not-supported") == expected_skips
    assert run.ids("passed") == set(run.outcomes()) - expected_skips
    # Levels L1 and L2 get one case per declared block size, head size and dtype.
    assert len(run.ids("passed")) == {"cuda": 68, "rocm": 60, "xpu": 61}[name]
    for level in ("L0", "L1", "L2", "L5"):
        assert any(r["level"] == level for r in report["results"])
    assert "emulated" in run.output
