"""The GPU check's parts that run without a GPU: its arithmetic (bytes a decode step reads, the
floor), its argument checks, and a dry run of the whole script on the CPU with a tiny dummy
model (no conformance), which must write the JSON it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossinfer.commands import gpu_check
from crossinfer.loader.dummy import dummy_config


def test_llama_8b_bytes_per_decode_step() -> None:
    config, _ = dummy_config("llama-3.1-8b")
    got = gpu_check.model_bytes(config, torch.bfloat16)
    # 8,030,261,248 parameters less the embedding table (128256 x 4096, only gathered) and
    # the 65 RMSNorm vectors (elementwise); two bytes each in bf16.
    linear_and_head = 8_030_261_248 - 128256 * 4096 - 65 * 4096
    assert got.weight_bytes == 2 * linear_and_head
    assert got.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads


def test_floor_arithmetic() -> None:
    bytes_ = gpu_check.ModelBytes(weight_bytes=16 * 10**9, kv_bytes_per_token=131072)
    assert gpu_check.decode_bytes(bytes_, 0) == 16 * 10**9
    assert gpu_check.decode_bytes(bytes_, 1000) == 16 * 10**9 + 131_072_000
    assert gpu_check.floor_seconds(4 * 10**12, 4 * 10**12) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        gpu_check.floor_seconds(1, 0.0)
    # step i of 1 .. 255 runs each of 100 sequences at 512 + i tokens: mean 640
    assert gpu_check.mean_decode_context(100, 512, 256) == 100 * 640
    assert gpu_check.mean_decode_context(3, 10, 1) == 30


def test_arguments_default_to_the_issue_workload_and_bad_ones_are_refused() -> None:
    args = gpu_check.build_parser().parse_args([])
    assert (args.model, args.dtype, args.device) == ("llama-3.1-8b", "bfloat16", "cuda")
    assert (args.num_prompts, args.input_len, args.output_len) == (100, 512, 256)
    with pytest.raises(SystemExit, match="--num-prompts"):
        gpu_check.check_args(gpu_check.build_parser().parse_args(["--num-prompts", "0"]))


def test_copy_bandwidth_is_positive_on_the_cpu() -> None:
    rate = gpu_check.copy_bandwidth(torch.device("cpu"), lambda: None, num_bytes=1 << 22, repeats=2)
    assert rate > 0


def test_cpu_dry_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(
        ["--device", "cpu", "--model", "smollm2-135m", "--dtype", "float32", "--skip-conformance",
         "--num-prompts", "2", "--input-len", "8", "--output-len", "4", "--copy-bytes",
         str(1 << 22), "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["backend"] == "cpu" and report["copy_bandwidth_gb_s"] > 0
    assert report["model"]["output_tokens"] == 8 and report["model"]["decode_steps"] == 3
    assert report["decode_floor_s"] > 0 and report["decode_step_over_floor"] > 0
