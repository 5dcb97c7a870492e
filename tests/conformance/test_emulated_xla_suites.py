"""The torch-xla backends pass the suite on XLA's CPU device (``crossinfer conformance
--device tpu|neuron --emulate``) in the compat environment (torch 2.8 + torch-xla 2.8.1, which
``make test`` creates as .venv-xla): the reference static-shape ops, the padded-batch runner,
the warm-up and the recompile check, with what only the hardware runs recorded not-supported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossinfer.backend import EMULATE_ENV
from tests.conformance.embedded_greedy import MAX_TOKENS
from tests.conformance.runs import COMPAT_PYTHON, SuiteRuns

pytestmark = pytest.mark.slow

# Not declared by either: fp16 (emulated), block sizes 1 and 8.
UNDECLARED = {
    "L2-attention-mixed-fp16-bs16-h64-gqa1",
    "L2-attention-mixed-fp16-bs16-h64-gqa4",
    "L2-attention-mixed-fp32-bs1-h64-gqa2",
    "L2-attention-mixed-fp32-bs8-h64-gqa2",
    "L2-write_kv-fp16-bs16-h64",
    "L2-write_kv-fp32-bs1-h64",
    "L2-write_kv-fp32-bs8-h128",
    "L2-copy_blocks-fp32-bs8-h128",
}
HARDWARE_ONLY = {
    # The device's own attention kernel (Pallas' ragged paged attention; NKI not built).
    "L2-native-attention-mixed-fp32-bs16-h64-gqa2",
    # XLA's CPU device commits memory lazily: the release of a cache cannot be observed.
    "L3-free_memory",
}
NOT_SUPPORTED = {
    "tpu": UNDECLARED | HARDWARE_ONLY | {"L2-attention-mixed-fp32-bs16-h80-gqa2"},  # head 80
    "neuron": UNDECLARED | HARDWARE_ONLY,
}
PASSED = {"tpu": 55, "neuron": 55}


@pytest.mark.parametrize("device", ["tpu", "neuron"])
def test_passes_emulated_on_the_xla_cpu_device(suite_runs: SuiteRuns, device: str) -> None:
    assert COMPAT_PYTHON.exists(), (
        f"{COMPAT_PYTHON} is missing: make test creates the torch-xla compat environment"
    )
    run = suite_runs.get(f"{device}-emulated")
    assert run.returncode == 0, run.output[-4000:]
    report = run.report
    assert (report["backend"], report["package"]) == (device, f"crossinfer-{device}")
    assert report["emulated"] and report["levels"] == "L0-L5"
    assert report["device"] == f"XLA CPU device (emulated {device})"
    assert report["torch_version"].startswith("2.8.")
    assert run.ids("not-supported") == NOT_SUPPORTED[device]
    assert run.ids("passed") == set(run.outcomes()) - NOT_SUPPORTED[device]
    assert len(run.ids("passed")) == PASSED[device]
    for case in ("L2-static-padded-mixed-fp32-bs16-h64-gqa2", "L2-static-sink-mixed-fp32-bs16-h64",
                 "L5-static-no-recompile", "L4-all_reduce", "L5-engine-preemption",
                 "L5-engine-prefix-cache", "L5-engine-greedy"):  # fmt: skip
        assert case in run.ids("passed")


def test_embedded_model_greedy_on_emulated_neuron_equals_cpu() -> None:
    """SmolLM2-135M through the emulated neuron backend (prefill and decode graphs at Neuron's
    buckets) gives the CPU backend's greedy tokens, through prefix-cache hits and a
    preemption."""
    from crossinfer.loader.default_model import default_model_path

    model = default_model_path()
    script = str(Path(__file__).with_name("embedded_greedy.py"))
    root = Path(__file__).parents[2]
    # Both at once: the CPU run is short, and mostly waits to import torch.
    running = {
        device: subprocess.Popen([python, script, model, device], env=env, cwd=root,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for device, python, env in (
            ("cpu", sys.executable, dict(os.environ)),
            ("neuron", str(COMPAT_PYTHON), {**os.environ, EMULATE_ENV: "1"}),
        )
    }  # fmt: skip
    runs = {}
    try:
        for device, process in running.items():
            stdout, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-4000:]
            runs[device] = json.loads(stdout.splitlines()[-1])
    finally:  # a failure in one leaves no process behind
        for process in running.values():
            process.kill()
            process.wait()
    cpu, neuron = runs["cpu"], runs["neuron"]
    assert neuron["tokens"] == cpu["tokens"]
    assert all(len(t) == MAX_TOKENS for t in cpu["tokens"])
    assert neuron["preemptions"] > 0 and neuron["prefix_hit_tokens"] > 0
