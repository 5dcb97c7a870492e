"""``benchmarks/gpu_check.sh``: what a GPU machine shows the first time the project meets one.

One run, about 10 minutes on a single GPU, writing one JSON file:

1. the conformance suite on the device's backend, for real (not emulated): the report path
   and its pass / fail counts;
2. the device's copy bandwidth (a large device-to-device copy: bytes read + written / time);
3. a dummy model of a named shape (default Llama-3.1-8B, random weights, ``--load-format
   dummy``) serving ``num_prompts`` requests of ``input_len`` token ids in and ``output_len``
   out at once (EOS ignored, greedy, bf16): output tok/s, and the median decode step against its
   memory floor — the bytes a decode step must read (every linear weight and the LM head once,
   plus the KV cache of every running sequence) over the measured bandwidth.

The arithmetic (``decode_bytes``, ``floor_seconds``) and the argument handling run anywhere;
the rest needs the device. ``--skip-conformance`` and small settings make a CPU dry run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelBytes:
    """What one decode step reads, per model."""

    weight_bytes: int
    """Every parameter the step multiplies by: linear layers and the LM head (the embedding is
    only gathered, one row per token, so a separate table counts nothing)."""
    kv_bytes_per_token: int
    """Keys and values of one cached token over all layers."""


def model_bytes(config: Any, dtype: torch.dtype) -> ModelBytes:
    """From an HF Llama-family config: see ModelBytes."""
    from crossinfer.models.llama import LlamaArgs

    size = torch.tensor([], dtype=dtype).element_size()
    a = LlamaArgs.from_config(config)
    params = a.num_layers * a.linear_params_per_layer + a.hidden_size * a.vocab_size  # + head
    kv = 2 * a.num_layers * a.num_kv_heads * a.head_dim * size
    return ModelBytes(weight_bytes=params * size, kv_bytes_per_token=kv)


def decode_bytes(model: ModelBytes, context_tokens: int) -> int:
    """Bytes one decode step reads when its sequences hold ``context_tokens`` tokens in all."""
    return model.weight_bytes + model.kv_bytes_per_token * context_tokens


def floor_seconds(num_bytes: int, bandwidth: float) -> float:
    """The least time reading ``num_bytes`` can take at ``bandwidth`` bytes/s."""
    if bandwidth <= 0:
        raise ValueError("bandwidth must be positive")
    return num_bytes / bandwidth


def mean_decode_context(num_prompts: int, input_len: int, output_len: int) -> int:
    """Tokens in the cache summed over the sequences, averaged over the decode steps: step
    ``i`` (1 .. output_len - 1) runs every sequence at context ``input_len + i``."""
    steps = range(1, output_len)
    if not steps:
        return num_prompts * input_len
    return num_prompts * round(statistics.fmean(input_len + i for i in steps))


def copy_bandwidth(
    device: torch.device,
    synchronize: Callable[[], None],
    num_bytes: int = 1 << 30,
    repeats: int = 10,
) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of ``repeats``;
    ``synchronize`` waits for the device (the backend's)."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llama-3.1-8b", help="a built-in shape or a folder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--copy-bytes", type=int, default=1 << 30)
    parser.add_argument("--skip-conformance", action="store_true")
    parser.add_argument("--conformance-report", default="gpu_check_conformance.json")
    parser.add_argument("--output", default="gpu_check.json", help="the JSON file written")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")


def run_conformance(device: str, report: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "crossinfer.cli",
            "conformance",
            "--device",
            device,
            "--report",
            report,
        ]
    )
    summary: dict[str, Any] = {"exit_code": done.returncode, "report": report}
    try:
        with open(report) as f:
            data = json.load(f)
        summary["counts"] = data["summary"]
    except (OSError, ValueError, KeyError) as exc:
        summary["counts"] = f"no report: {exc!r}"
    return summary


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    from crossinfer.llm import LLM
    from crossinfer.sampling_params import SamplingParams

    llm = LLM(
        model=args.model,
        load_format="dummy",
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.num_prompts,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.input_len + args.output_len,
    )
    runner = llm.engine.runner
    decode_steps: list[float] = []
    execute = runner.execute

    def timed(output: Any) -> Any:
        start = time.perf_counter()
        result = execute(output)  # sampled tokens are on the host: the step is finished
        if all(chunk.num_new_tokens == 1 for chunk in output.chunks):
            decode_steps.append(time.perf_counter() - start)
        return result

    runner.execute = timed  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(0)
    vocab = llm.engine.vocab_size
    prompts = torch.randint(0, vocab, (args.num_prompts, args.input_len), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    decode_steps.clear()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    loaded = llm.engine.parts.loaded
    bytes_ = model_bytes(loaded.model_files.config, loaded.dtype)
    return {
        "output_tokens": produced,
        "seconds": seconds,
        "output_tokens_per_s": produced / seconds,
        "decode_step_median_s": statistics.median(decode_steps) if decode_steps else None,
        "decode_steps": len(decode_steps),
        "model_bytes": asdict(bytes_),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from crossinfer.registry import resolve_device

    backend = resolve_device(args.device)
    result: dict[str, Any] = {"settings": vars(args), "backend": backend.name}
    result["device_names"] = list(backend.probe().devices)
    if not args.skip_conformance:
        result["conformance"] = run_conformance(args.device, args.conformance_report)
    bandwidth = copy_bandwidth(backend.device(), backend.synchronize, args.copy_bytes)
    result["copy_bandwidth_gb_s"] = bandwidth / 1e9
    model = run_model(args)
    result["model"] = model
    step = model["decode_step_median_s"]
    if step is not None:
        context = mean_decode_context(args.num_prompts, args.input_len, args.output_len)
        bytes_ = ModelBytes(**model["model_bytes"])
        floor = floor_seconds(decode_bytes(bytes_, context), bandwidth)
        result["decode_floor_s"] = floor
        result["decode_step_over_floor"] = step / floor
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
