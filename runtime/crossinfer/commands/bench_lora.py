"""``crossinfer bench lora``: offline throughput with LoRA adapters mixed in one batch, against
the base model alone.

Workload as ``bench throughput``'s: ``num_prompts`` prompts of ``input_len`` random token ids,
greedy, ``output_len`` tokens each with EOS ignored. ``--lora-adapters N`` random adapters of
rank ``--lora-rank`` on every projection (q/k/v, o, gate/up, down) are written as PEFT folders
into a temporary folder; prompt ``i`` runs under adapter ``i % N``. Three figures: the model
loaded without LoRA layers, the base model on the LoRA engine (requests without an adapter:
the cost of the wrapped layers alone), and the adapters mixed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from crossinfer.commands.bench_throughput import Figure, random_prompts
from crossinfer.engine.setup import EngineConfig, LoadedModel, load_model
from crossinfer.lora.adapter import CONFIG_FILE, MODULES, WEIGHTS_FILE
from crossinfer.lora.request import LoRARequest
from crossinfer.models.llama import LlamaArgs


def run(args: argparse.Namespace) -> int:
    from crossinfer.engine_args import engine_config_from_args

    config = engine_config_from_args(args)
    num = args.lora_adapters
    lora_config = replace(
        config, enable_lora=True, max_loras=max(config.max_loras, num), max_lora_rank=args.lora_rank
    )
    figures = []
    with tempfile.TemporaryDirectory(prefix="crossinfer-lora-bench-") as root:
        plain = load_model(replace(config, enable_lora=False))
        prompts = random_prompts(plain, args.num_prompts, args.input_len, args.seed + 1)
        figures.append(_timed("base model, no LoRA layers", plain, config, prompts, args, []))
        del plain
        loaded = load_model(lora_config)
        loras = [
            LoRARequest(f"random-{i}", i + 1, str(write_random_adapter(
                Path(root) / f"adapter-{i}", loaded.model.args, args.lora_rank, args.seed + i
            )))
            for i in range(num)
        ]  # fmt: skip
        figures.append(
            _timed("base model on the LoRA engine", loaded, lora_config, prompts, args, [])
        )
        name = f"{num} adapters (rank {args.lora_rank}) mixed"
        figures.append(_timed(name, loaded, lora_config, prompts, args, loras))
    for figure in figures:
        print(f"{figure.name:40s} {figure.tokens_per_s:8.1f} tokens/s ({figure.seconds:.2f} s)")
    if args.json_path:
        payload = [asdict(f) | {"tokens_per_s": f.tokens_per_s} for f in figures]
        Path(args.json_path).write_text(json.dumps(payload, indent=2))
    return 0


def _timed(
    name: str,
    loaded: LoadedModel,
    config: EngineConfig,
    prompts: list[list[int]],
    args: argparse.Namespace,
    loras: list[LoRARequest],
) -> Figure:
    from crossinfer.llm import LLM
    from crossinfer.sampling_params import SamplingParams

    llm = LLM(loaded=loaded, **asdict(config))
    per_prompt = [loras[i % len(loras)] if loras else None for i in range(len(prompts))]
    warm = SamplingParams(temperature=0.0, max_tokens=4)
    llm.generate(prompts[: len(loras) or 1], warm, lora_request=per_prompt[: len(loras) or 1])
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    # The warm-up's prompts reversed: nothing of the timed ones is in the prefix cache.
    fresh = [p[::-1] for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(fresh, params, lora_request=per_prompt)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    return Figure(name, len(prompts), produced, seconds)


def write_random_adapter(folder: Path, args: LlamaArgs, rank: int, seed: int) -> Path:
    """A PEFT folder with random A and small random B on every projection of every layer."""
    gen = torch.Generator().manual_seed(seed)
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    hidden, mlp = args.hidden_size, args.intermediate_size
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (q, hidden), "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp),
              "down_proj": (mlp, hidden)}  # fmt: skip
    tensors = {}
    for layer in range(args.num_layers):
        for module, (fan_in, fan_out) in shapes.items():
            group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            )
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(MODULES)}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder
