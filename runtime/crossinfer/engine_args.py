"""Command-line flags for an engine, shared by ``generate``, ``bench`` and ``serve``."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine pulls in transformers; flags are built without it
    from crossinfer.engine.setup import EngineConfig

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"4GiB"``, ``"512m"``, ``"1073741824"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--dtype``, scheduling and KV-cache flags (``--device`` is separate)."""
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=None)
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument(
        "--kv-cache-memory", type=parse_bytes, default=None, help="KV-cache size, e.g. 2GiB"
    )
    memory.add_argument(
        "--memory-utilization",
        type=float,
        default=None,
        help="fraction of device memory to fill with weights and KV cache (default 0.9)",
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of shared prompt prefixes (default: on)",
    )
    parser.add_argument(
        "--prefix-cache-seed",
        default=None,
        help="seed the prefix-cache block hashes so they are the same in every process "
        "(default: a random seed per process, so they cannot be predicted)",
    )
    parser.add_argument(
        "--compile-cache-dir",
        default=None,
        help="where a compiling backend (tpu) keeps its graphs across restarts (default: "
        "$XDG_CACHE_HOME/crossinfer/compile/<backend>)",
    )
    parser.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="most logprobs (and prompt logprobs) a request may ask for (default 20)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        "--num-shard",  # TGI's name
        dest="tensor_parallel_size",
        type=int,
        default=1,
        help="split the model over this many ranks, one process per device (default 1)",
    )
    parser.add_argument(
        "--distributed-executor-backend",
        choices=("mp", "ray"),
        default="mp",
        help="how the other ranks start: mp, processes of this machine (default); ray, actors "
        "placed by Ray on its cluster (pip install 'crossinfer[ray]'). Under torchrun the "
        "launcher starts them",
    )
    parser.add_argument(
        "--quantization",
        "-q",
        default=None,
        help="quantise the weights at load: int8 (int8 weights per output channel, int8 "
        "activations per token; the cpu backend). A backend lists what it supports in "
        "`crossinfer backends`",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="dtype of the KV cache: auto (the model's dtype), bfloat16, float16, float32, "
        "fp8 (e4m3), fp8_e5m2, where the backend supports it (`crossinfer backends`). "
        "bfloat16 under an fp32 model halves the cache's bytes and what decode reads",
    )
    parser.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default="auto",
        help="auto: read the weights of --model; dummy: random weights from a config.json "
        "folder or a built-in shape (llama-3.1-8b, llama-3.2-1b, qwen2.5-7b, smollm2-135m), "
        "for benchmarks of models not on disk",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters beside the base model: a request names one, and requests of "
        "different adapters run in the same batch",
    )
    parser.add_argument(
        "--max-loras",
        type=int,
        default=1,
        help="LoRA adapters resident on the device at once, and so in one step (default 1)",
    )
    parser.add_argument(
        "--max-lora-rank", type=int, default=16, help="largest LoRA rank accepted (default 16)"
    )
    parser.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="LoRA adapters kept in host memory, read again from their folder beyond it "
        "(default: --max-loras)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    from crossinfer.engine.setup import EngineConfig

    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        memory_utilization=args.memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        prefix_cache_seed=args.prefix_cache_seed,
        max_logprobs=args.max_logprobs,
        compile_cache_dir=args.compile_cache_dir,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        load_format=args.load_format,
        seed=args.seed,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
    )
