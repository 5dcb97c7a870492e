"""``crossinfer bench throughput``: offline throughput of the engine against transformers,
measured in the same run on the same prompts and weights.

Workload: ``num_prompts`` prompts of exactly ``input_len`` random token ids (seeded; each of
the ``--rounds`` rounds draws its own, so no round reads another's prefix cache), greedy,
``output_len`` tokens each with EOS ignored. Baselines: transformers' ``generate`` on the same
weights as one static batch (all prompts have the same length, so no padding) and one request
at a time (on the first ``single_prompts`` prompts); with ``--baseline vllm``, vLLM's offline
engine in a subprocess (vllm_baseline.py) on the same token ids, weights and settings, its runs
interleaved with crossinfer's over ``--rounds`` rounds and compared by their medians. The
compute floor is the workload's matrix-multiply FLOPs divided by this machine's measured
matmul rate in the model's dtype (the faster of torch's GEMM and oneDNN's on a square shape).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from crossinfer.engine.setup import EngineConfig, LoadedModel, load_model


@dataclass(frozen=True)
class Figure:
    name: str
    num_requests: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def run(args: argparse.Namespace) -> int:
    from crossinfer.engine_args import engine_config_from_args

    config = engine_config_from_args(args)
    if args.baseline == "vllm":  # before loading anything: a missing vLLM fails in seconds
        from crossinfer.commands.vllm_baseline import BaselineUnavailable, vllm_version

        try:
            vllm_version(args.baseline_python)
        except BaselineUnavailable as exc:
            print(f"--baseline vllm: {exc}", file=sys.stderr)
            return 2
    loaded = load_model(config)
    # Warm-up and every round draw their own prompts: a round never reads the prefix cache of
    # another (with one set, later rounds would find every prompt cached).
    warmup = random_prompts(loaded, 2, args.input_len, args.seed)
    rounds = [
        random_prompts(loaded, args.num_prompts, args.input_len, args.seed + 1 + i)
        for i in range(args.rounds)
    ]
    prompts = rounds[0]
    engine = _EngineRun(loaded, config, warmup, args.output_len)
    if args.baseline == "vllm":
        figures = _rounds_with_vllm(args, engine, loaded, config, warmup, rounds)
    else:
        figures = [engine.run(f"crossinfer round {i + 1}", p) for i, p in enumerate(rounds)]
    if not args.no_baselines and config.load_format == "dummy":
        print("transformers baselines skipped: --load-format dummy has no weights to give them")
    elif not args.no_baselines:
        reference = _transformers_model(loaded)
        figures.append(_bench_hf_static(reference, prompts, args.output_len))
        figures.append(_bench_hf_single(reference, prompts[: args.single_prompts], args.output_len))
    rate = _matmul_rate(torch.int8 if config.quantization == "int8" else loaded.dtype)
    floor = _floor_tokens_per_s(loaded, args.num_prompts, args.input_len, args.output_len, rate)
    report = _report(loaded, args, figures, rate, floor)
    print(report)
    if args.json_path:
        with open(args.json_path, "w") as f:
            payload = {
                "settings": vars(args) | {"run": None},
                "figures": [asdict(f) | {"tokens_per_s": f.tokens_per_s} for f in figures],
                "matmul_gflops": rate / 1e9,
                "floor_tokens_per_s": floor,
            }
            json.dump(payload, f, indent=2, default=str)
    return 0


def random_prompts(loaded: LoadedModel, num: int, length: int, seed: int) -> list[list[int]]:
    """``num`` prompts of ``length`` random token ids, none of them special."""
    gen = torch.Generator().manual_seed(seed)
    vocab = loaded.model.args.vocab_size
    special = set(loaded.tokenizer.all_special_ids)
    ids = torch.randint(0, vocab, (num, length), generator=gen)
    # Replace special tokens so no prompt carries an end-of-text marker.
    return [[t if t not in special else (t + 100) % vocab for t in row] for row in ids.tolist()]


class _EngineRun:
    """crossinfer's engine, built and warmed up once; ``run`` times one pass of prompts."""

    def __init__(
        self, loaded: LoadedModel, config: EngineConfig, warmup: list[list[int]], output_len: int
    ) -> None:
        from crossinfer.llm import LLM
        from crossinfer.sampling_params import SamplingParams

        self.llm = LLM(loaded=loaded, **asdict(config))
        self.params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        self.llm.generate(warmup, SamplingParams(temperature=0.0, max_tokens=4))

    def run(self, name: str, prompts: list[list[int]]) -> Figure:
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, self.params)
        seconds = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outputs)
        return Figure(name, len(prompts), produced, seconds)


def _rounds_with_vllm(
    args: argparse.Namespace,
    engine: _EngineRun,
    loaded: LoadedModel,
    config: EngineConfig,
    warmup: list[list[int]],
    rounds: list[list[list[int]]],
) -> list[Figure]:
    """crossinfer's runs and vLLM's, alternating; a GGUF model is exported for vLLM to a
    temporary folder, removed afterwards."""
    from crossinfer.commands.vllm_baseline import VllmBaseline, export_hf_folder

    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="crossinfer-vllm-model-") as folder:
        baseline = VllmBaseline(
            args.baseline_python,
            _vllm_setup(args, loaded, config, warmup, export_hf_folder(loaded, folder)),
        )
        try:
            for i, prompts in enumerate(rounds):
                figures.append(engine.run(f"crossinfer round {i + 1}", prompts))
                seconds, produced = baseline.run(prompts)
                name = f"vLLM {baseline.version} round {i + 1}"
                figures.append(Figure(name, len(prompts), produced, seconds))
        finally:
            baseline.close()
    return figures


def _vllm_setup(
    args: argparse.Namespace,
    loaded: LoadedModel,
    config: EngineConfig,
    warmup: list[list[int]],
    model: str,
) -> dict[str, object]:
    return {
        "model": model,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "max_model_len": args.input_len + args.output_len,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "warmup": warmup,
        "output_len": args.output_len,
        "load_format": config.load_format,
        "seed": config.seed,
    }


def _transformers_model(loaded: LoadedModel) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    files = loaded.model_files
    model = AutoModelForCausalLM.from_config(files.config, dtype=loaded.dtype)
    model.load_state_dict(dict(files.iter_weights()), strict=False)
    model.tie_weights()
    return model.eval()


def _hf_generate(model: torch.nn.Module, ids: torch.Tensor, output_len: int) -> int:
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
    return int(out[:, ids.shape[1] :].numel())


def _bench_hf_static(model: torch.nn.Module, prompts: list[list[int]], output_len: int) -> Figure:
    _hf_generate(model, torch.tensor(prompts[:2]), 4)  # warm-up
    start = time.perf_counter()
    produced = _hf_generate(model, torch.tensor(prompts), output_len)
    return Figure("transformers static batch", len(prompts), produced, time.perf_counter() - start)


def _bench_hf_single(model: torch.nn.Module, prompts: list[list[int]], output_len: int) -> Figure:
    start = time.perf_counter()
    produced = sum(_hf_generate(model, torch.tensor([p]), output_len) for p in prompts)
    seconds = time.perf_counter() - start
    return Figure("transformers one request at a time", len(prompts), produced, seconds)


def _matmul_rate(dtype: torch.dtype, size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a square matmul in ``dtype`` on the CPU, best of a few timed runs of torch's
    GEMM and, for fp32, oneDNN's on a pre-packed weight (what the CPU backend's linear layers
    run): the floor is the faster of the two. int8: ``torch._int_mm``, int8 ops/s."""
    if dtype == torch.int8:  # int8 in, int32 out: what an int8 linear layer runs
        a = torch.randint(-127, 128, (size, size), dtype=dtype)
        b = torch.randint(-127, 128, (size, size), dtype=dtype)
        gemms = [lambda: torch._int_mm(a, b)]
    else:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        gemms = [lambda: torch.mm(a, b)]
    if torch.backends.mkldnn.is_available() and dtype == torch.float32:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())
        gemms.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    best = float("inf")
    for gemm in gemms:
        gemm()
        for _ in range(repeats):
            start = time.perf_counter()
            gemm()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _floor_tokens_per_s(
    loaded: LoadedModel, num: int, input_len: int, output_len: int, rate: float
) -> float:
    """Output tokens/s if every matmul FLOP of the workload ran at the measured rate."""
    a = loaded.model.args
    per_layer = a.linear_params_per_layer
    computed = input_len + output_len - 1  # the last sampled token is never fed back
    flops = 2 * a.num_layers * per_layer * computed * num
    flops += 2 * a.hidden_size * a.vocab_size * output_len * num  # logits of sampled tokens
    context = computed * (computed + 1) // 2  # keys each token attends to, summed
    flops += 4 * a.num_layers * a.num_heads * a.head_dim * context * num
    return num * output_len / (flops / rate)


def _median_rate(figures: list[Figure], prefix: str) -> float:
    rates = [f.tokens_per_s for f in figures if f.name.startswith(prefix)]
    return statistics.median(rates) if rates else 0.0


def _report(
    loaded: LoadedModel, args: argparse.Namespace, figures: list[Figure], rate: float, floor: float
) -> str:
    ours = _median_rate(figures, "crossinfer")
    quantization = getattr(args, "quantization", None) or "none"
    lines = [
        f"model {loaded.model_files.path} | backend {loaded.backend.name} | "
        f"dtype {str(loaded.dtype).removeprefix('torch.')} | quantization {quantization} | "
        f"threads {torch.get_num_threads()}",
        f"{args.num_prompts} prompts x {args.input_len} tokens in, {args.output_len} out, greedy",
        "",
        "| run | requests | output tokens | seconds | output tok/s | crossinfer / this |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.name} | {f.num_requests} | {f.output_tokens} | {f.seconds:.2f} | "
            f"{f.tokens_per_s:.1f} | {ours / f.tokens_per_s:.2f}x |"
        )
    vllm = _median_rate(figures, "vLLM")
    if vllm:
        lines += [
            "",
            f"medians over {args.rounds} interleaved rounds: crossinfer {ours:.1f} tok/s, vLLM "
            f"{vllm:.1f} tok/s (unquantised, {str(loaded.dtype).removeprefix('torch.')}): "
            f"crossinfer / vLLM = {ours / vllm:.2f}x",
        ]
    lines += [
        "",
        f"matmul rate {rate / 1e9:.1f} G{'OP' if quantization == 'int8' else 'FLOP'}/s "
        f"({'int8' if quantization == 'int8' else str(loaded.dtype).removeprefix('torch.')}) "
        f"-> compute floor {floor:.1f} output tok/s; "
        f"crossinfer reaches {ours / floor:.2f} of it",
    ]
    return "\n".join(lines)
