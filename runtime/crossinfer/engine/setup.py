"""Engine configuration, and building the engine's parts from it in the right order:
device first (a missing one fails before any loading), then model, then the KV cache."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from crossinfer.backend import Backend, EngineLimits, KVCacheSpec, StaticShapes
from crossinfer.distributed.tensor_parallel import TensorParallel, check_sizes
from crossinfer.engine.kv_cache import KVCacheManager
from crossinfer.engine.launched import LaunchedWorkers, for_launch, launched_ranks
from crossinfer.engine.ray_workers import RayWorkers
from crossinfer.engine.runner import ModelRunner
from crossinfer.engine.scheduler import Scheduler, SchedulerConfig
from crossinfer.engine.workers import RunnerSpec, SpawnedWorkers, WorkerGroup, local_init_method
from crossinfer.loader import ModelFiles, open_model
from crossinfer.loader.dummy import fill_random, open_dummy_model
from crossinfer.lora.manager import LoRAConfig, LoRAManager
from crossinfer.models.llama import LlamaArgs, LlamaForCausalLM
from crossinfer.models.registry import build_model
from crossinfer.registry import resolve_device

logger = logging.getLogger("crossinfer")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
KV_CACHE_DTYPES = {
    **DTYPES,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
"""--kv-cache-dtype's names besides auto (vLLM's, and the --dtype names)."""


@dataclass(frozen=True)
class EngineConfig:
    """Everything a user may set about one engine. None means "choose for me"."""

    model: str | None = None
    """HF folder or .gguf file; None is the embedded default model."""
    device: str = "auto"
    dtype: str = "auto"
    """auto: the backend's preferred dtype (the first it lists)."""
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int | None = None
    kv_cache_memory: int | None = None
    """KV-cache bytes; wins over memory_utilization."""
    memory_utilization: float | None = None
    """Fraction of device memory the engine may fill (weights already loaded count)."""
    enable_prefix_caching: bool = True
    prefix_cache_seed: str | None = None
    """Seeds the prefix-cache block hashes, making them the same in every process; None (the
    default) draws a random per-process seed, so they cannot be predicted from outside."""
    max_logprobs: int = 20
    """Most ``logprobs`` / ``prompt_logprobs`` a request may ask for (vLLM's --max-logprobs)."""
    compile_cache_dir: str | None = None
    """Where a compiling backend keeps its graphs across restarts; None: under the user's
    cache directory (``$XDG_CACHE_HOME/crossinfer/compile/<backend>``)."""
    fail_on_recompile: bool = False
    """Raise (instead of logging) when a compiled backend compiles a graph after warm-up."""
    tensor_parallel_size: int = 1
    """Ranks the model is split over, one process each (engine/workers.py)."""
    distributed_executor_backend: str = "mp"
    """Who starts ranks 1 .. N-1: "mp" (spawned processes) or "ray" (Ray actors)."""
    quantization: str | None = None
    """A method of the backend's ``Capabilities.quantizations`` (e.g. "int8"), or None."""
    kv_cache_dtype: str = "auto"
    """auto: the model's dtype; else a name of :data:`KV_CACHE_DTYPES` the backend lists in
    ``Capabilities.kv_cache_dtypes`` (e.g. bfloat16 under an fp32 model: half the cache
    bytes, twice the blocks, keys and values rounded to bf16)."""
    load_format: str = "auto"
    """auto: read the weights from ``model``; dummy: random weights from a config alone
    (``model`` is a folder with a config.json, or a built-in shape; loader/dummy.py)."""
    seed: int = 0
    enable_lora: bool = False
    """Wrap the projections in LoRA layers, so requests may name adapters (crossinfer.lora)."""
    max_loras: int = 1
    """Adapters resident on the device at once, so in one step (vLLM's --max-loras)."""
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    """Adapters kept in host memory; None: max_loras."""

    @property
    def lora_config(self) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)


@dataclass(frozen=True)
class LoadedModel:
    """A model with weights on a backend, and its tokenizer: the slow part of building an
    engine, reusable by several engines with different scheduling or cache settings."""

    backend: Backend
    model_files: ModelFiles
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: frozenset[int]
    workers: WorkerGroup | None = None
    """Ranks 1 .. N-1 under tensor parallelism (this process is rank 0)."""
    lora: LoRAManager | None = None
    """The model's LoRA layers and adapters, when loaded with enable_lora."""


@dataclass(frozen=True)
class EngineParts:
    config: EngineConfig
    loaded: LoadedModel
    max_model_len: int
    kv_spec: KVCacheSpec
    num_blocks: int
    scheduler: Scheduler
    runner: ModelRunner


def load_model(config: EngineConfig, backend: Backend | None = None) -> LoadedModel:
    """Resolve the device (failing before any loading), then load weights and tokenizer.
    ``backend``: use this instance instead of resolving ``config.device``. With a
    tensor-parallel size above 1 this process is rank 0 and the other ranks start here."""
    backend = backend or resolve_device(config.device)
    check_quantization(config.quantization, backend)
    check_kv_cache_dtype(config.kv_cache_dtype, backend)
    launched = launched_ranks()  # torchrun (or another env:// launcher) started the ranks
    if launched is not None:
        config = for_launch(config, launched[1])
    size = config.tensor_parallel_size
    if size == 1:
        return load_shard(config, backend, TensorParallel())
    check_parallel(size, backend, _open(config).config)
    workers: WorkerGroup
    if launched is not None:
        if launched[0] != 0:
            raise ValueError("only rank 0 loads an engine; the other ranks run as workers")
        communicator = backend.communicator(0, size, "env://")
        workers = LaunchedWorkers(size)
    elif config.distributed_executor_backend == "ray":
        workers, init_method = RayWorkers.start(config)
    else:
        init_method = local_init_method()
        workers = SpawnedWorkers.start(config, init_method)
    try:
        if launched is None:
            communicator = backend.communicator(0, size, init_method)
        loaded = load_shard(config, backend, TensorParallel(0, size, communicator))
        workers.wait_ready()
    except BaseException:
        workers.close()
        raise
    return replace(loaded, workers=workers)


def load_shard(config: EngineConfig, backend: Backend, tp: TensorParallel) -> LoadedModel:
    """This rank's part of the model (all of it at size 1), and the tokenizer."""
    backend.seed(config.seed)
    backend.set_compile_cache_dir(config.compile_cache_dir or _default_compile_cache(backend))
    files = _open(config)
    dtype = _pick_dtype(config.dtype, backend.capabilities().dtypes, backend.name)
    max_model_len = _max_model_len(config, files)
    model = build_model(files.config, backend, dtype, max_model_len, tp)
    if config.load_format == "dummy":
        fill_random(model, config.seed + tp.rank)
    else:
        # Each rank reads only its slices (safetensors), or slices each tensor as it is made.
        model.load_weights(files.iter_weights(select=model.shards.select), whole=False)
    lora_config = config.lora_config
    # Before the backend's swaps, so that they reach the base linear inside each LoRA layer.
    lora = None if lora_config is None else LoRAManager(model, lora_config)
    if config.quantization is not None:
        model = backend.quantize_model(model, config.quantization)  # type: ignore[assignment]
    model = backend.prepare_model(model)  # type: ignore[assignment]
    tokenizer = files.load_tokenizer()
    eos = _eos_ids(files, tokenizer)
    return LoadedModel(backend, files, model, tokenizer, dtype, max_model_len, eos, lora=lora)


LOAD_FORMATS = ("auto", "dummy")


def _open(config: EngineConfig) -> ModelFiles:
    if config.load_format not in LOAD_FORMATS:
        raise ValueError(f"load format {config.load_format!r}: expected one of {LOAD_FORMATS}")
    if config.load_format == "dummy":
        return open_dummy_model(config.model)
    return open_model(config.model)


def check_quantization(method: str | None, backend: Backend) -> None:
    """Refuse, before anything is loaded, a quantisation the backend does not apply."""
    if method is None:
        return
    offered = backend.capabilities().quantizations
    if method not in offered:
        has = ", ".join(offered) if offered else "none"
        raise ValueError(
            f"--quantization {method}: the {backend.name} backend does not support it "
            f"(it supports: {has})"
        )


def check_kv_cache_dtype(name: str, backend: Backend) -> torch.dtype | None:
    """The dtype ``--kv-cache-dtype name`` asks for (None for auto: the model's), refused
    before anything is loaded when the name is unknown or the backend does not list it."""
    if name == "auto":
        return None
    if name not in KV_CACHE_DTYPES:
        known = ", ".join(["auto", *KV_CACHE_DTYPES])
        raise ValueError(f"--kv-cache-dtype {name}: unknown (choose from {known})")
    dtype = KV_CACHE_DTYPES[name]
    offered = backend.capabilities().kv_cache_dtypes
    if dtype not in offered:
        has = ", ".join(str(d).removeprefix("torch.") for d in offered)
        raise ValueError(
            f"--kv-cache-dtype {name}: the {backend.name} backend cannot store its KV cache "
            f"in {str(dtype).removeprefix('torch.')} (it supports: {has})"
        )
    return dtype


def check_parallel(size: int, backend: Backend, hf_config: PretrainedConfig) -> None:
    """Refuse, before anything is loaded, a tensor-parallel size this model or backend
    cannot take."""
    caps = backend.capabilities()
    if caps.distributed_backend is None:
        raise ValueError(
            f"--tensor-parallel-size {size}: the {backend.name} backend has no multi-device "
            "collectives"
        )
    args = LlamaArgs.from_config(hf_config)
    problem = check_sizes(args.num_heads, args.num_kv_heads, args.intermediate_size, size)
    if problem is not None:
        raise ValueError(f"--tensor-parallel-size {size}: {problem}")
    devices = backend.probe().devices
    if backend.device().type != "cpu" and len(devices) < size:  # the CPU's ranks share it
        raise ValueError(
            f"--tensor-parallel-size {size}: the {backend.name} backend has only "
            f"{len(devices)} devices ({', '.join(devices)})"
        )


def build_engine_parts(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineParts:
    """Size and allocate the KV cache and build the scheduler and runner around a model
    (loaded from ``config`` unless given)."""
    loaded = loaded or load_model(config)
    backend = loaded.backend
    max_model_len = config.max_model_len or loaded.max_model_len
    if max_model_len > loaded.max_model_len:
        raise ValueError(
            f"--max-model-len {max_model_len} exceeds the {loaded.max_model_len} positions the "
            "model was loaded for"
        )
    caps = backend.capabilities()
    block_size = config.block_size or caps.default_block_size
    if block_size not in caps.block_sizes:
        raise ValueError(
            f"--block-size {block_size} is not supported by the {backend.name} backend; "
            f"supported: {', '.join(map(str, caps.block_sizes))}"
        )
    args = loaded.model.args
    kv_heads = loaded.model.num_local_kv_heads  # this rank's share
    kv_dtype = check_kv_cache_dtype(config.kv_cache_dtype, backend) or loaded.dtype
    spec = KVCacheSpec(args.num_layers, kv_heads, args.head_dim, block_size, kv_dtype)
    limits = EngineLimits(
        config.max_num_batched_tokens, config.max_num_seqs, max_model_len, block_size
    )
    static = backend.static_shapes(limits)
    _check_lora(config, loaded, static is not None)
    limits = _fit_limits(limits, static, backend.name)
    num_blocks = _num_kv_blocks(config, backend, spec, max_model_len)
    if static is not None and not 0 <= static.pad_block < num_blocks:
        raise ValueError(
            f"the {backend.name} backend's sink block {static.pad_block} is not among the "
            f"{num_blocks} KV-cache blocks"
        )
    kv_caches = backend.allocate_kv_cache(spec, num_blocks)
    logger.info(
        "backend %s (%s), model %s, dtype %s, KV cache %d blocks x %d tokens (%.1f MiB, %s)",
        backend.name,
        ", ".join(backend.probe().devices),
        loaded.model_files.path,
        str(loaded.dtype).removeprefix("torch."),
        num_blocks,
        block_size,
        num_blocks * spec.bytes_per_block / 2**20,
        str(kv_dtype).removeprefix("torch."),
    )
    if not 0 <= config.max_logprobs <= args.vocab_size:
        raise ValueError(
            f"--max-logprobs {config.max_logprobs} must lie in [0, {args.vocab_size}] (the "
            "vocabulary)"
        )
    seed = config.prefix_cache_seed
    kv_manager = KVCacheManager(
        num_blocks,
        block_size,
        config.enable_prefix_caching,
        hash_seed=None if seed is None else seed.encode(),
        reserved=frozenset() if static is None else frozenset({static.pad_block}),
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        max_model_len=max_model_len,
        decode_first=static is not None and static.decode_first,
        split_prefill_decode=static is not None and static.split_prefill_decode,
        max_loras=config.max_loras,
    )
    runner = ModelRunner(
        loaded.model,
        backend,
        kv_caches,
        block_size,
        static,
        max_logprobs=config.max_logprobs,
        lora=loaded.lora if config.enable_lora else None,
    )
    if loaded.workers is not None:  # the other ranks build theirs, then mirror every call
        loaded.workers.send(
            "runner", RunnerSpec(spec, num_blocks, block_size, static, config.max_logprobs)
        )
        loaded.workers.collect()
        runner.workers = loaded.workers
    if static is not None:
        count, seconds = runner.warm_up(progress=not os.environ.get("CROSSINFER_NO_PROGRESS"))
        logger.info(
            "compiled %d step shapes in %.1f s (%s graphs); a new compile after this is logged",
            count,
            seconds,
            backend.compiled_graph_count(),
        )
    return EngineParts(
        config=config,
        loaded=loaded,
        max_model_len=max_model_len,
        kv_spec=spec,
        num_blocks=num_blocks,
        scheduler=Scheduler(scheduler_config, kv_manager),
        runner=runner,
    )


def _check_lora(config: EngineConfig, loaded: LoadedModel, static: bool) -> None:
    """Refuse LoRA where it cannot run: on a model loaded without its layers, or on a
    compiled-shape backend (the update has no padded form yet)."""
    if not config.enable_lora:
        return
    if loaded.lora is None:
        raise ValueError(
            "enable_lora: the model was loaded without LoRA layers; load it with enable_lora"
        )
    if loaded.lora.config != config.lora_config:
        raise ValueError(
            f"the model's LoRA layers were built for {loaded.lora.config}, not {config.lora_config}"
        )
    if static:
        raise ValueError(
            f"--enable-lora: the {loaded.backend.name} backend runs compiled static shapes, "
            "which LoRA does not support yet"
        )


def _fit_limits(limits: EngineLimits, static: StaticShapes | None, name: str) -> EngineLimits:
    """The engine's limits within a compiled backend's largest buckets."""
    if static is None:
        return limits
    if static.block_table_widths[-1] < limits.max_blocks_per_seq:
        raise ValueError(
            f"the {name} backend's widest block table ({static.block_table_widths[-1]} blocks) "
            f"cannot hold a {limits.max_model_len}-token sequence in blocks of "
            f"{limits.block_size}; lower --max-model-len"
        )
    seqs = min(limits.max_num_seqs, static.seq_buckets[-1], static.max_num_seqs or 1 << 30)
    tokens = min(limits.max_num_batched_tokens, static.token_buckets[-1])
    if seqs > tokens:
        raise ValueError(f"the {name} backend's buckets hold fewer tokens than sequences")
    return replace(limits, max_num_seqs=seqs, max_num_batched_tokens=tokens)


def _default_compile_cache(backend: Backend) -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "crossinfer", "compile", backend.name)


def _pick_dtype(name: str, supported: tuple[torch.dtype, ...], backend: str) -> torch.dtype:
    if name == "auto":
        return supported[0]
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: unknown; choose auto or one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        raise ValueError(f"--dtype {name} is not supported by the {backend} backend: {names}")
    return dtype


def _max_model_len(config: EngineConfig, files: ModelFiles) -> int:
    model_max = int(files.config.max_position_embeddings)
    # The model computes full attention; a sliding window only matters past its length.
    window = getattr(files.config, "sliding_window", None)
    if window and getattr(files.config, "use_sliding_window", True):
        model_max = min(model_max, int(window))
    if config.max_model_len is None:
        return model_max
    if config.max_model_len > model_max:
        raise ValueError(
            f"--max-model-len {config.max_model_len} exceeds the model's {model_max} positions"
        )
    return config.max_model_len


def _num_kv_blocks(
    config: EngineConfig, backend: Backend, spec: KVCacheSpec, max_model_len: int
) -> int:
    """Blocks that fit the budget, capped at what ``max_num_seqs`` full sequences can use."""
    if config.kv_cache_memory is not None:
        budget = config.kv_cache_memory
    else:
        default = backend.capabilities().default_kv_cache_bytes
        fraction = config.memory_utilization
        if fraction is None and default is not None:
            budget = default
        else:
            mem = backend.memory_info()
            used = mem.total_bytes - mem.free_bytes
            budget = int((fraction or 0.9) * mem.total_bytes) - used
    num_blocks = budget // spec.bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"the KV-cache budget of {max(budget, 0) / 2**20:.1f} MiB holds no block of "
            f"{spec.bytes_per_block / 2**20:.2f} MiB; raise --kv-cache-memory or "
            "--memory-utilization"
        )
    usable = config.max_num_seqs * -(-max_model_len // spec.block_size)
    return int(min(num_blocks, usable))


def _eos_ids(files: ModelFiles, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(files.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
