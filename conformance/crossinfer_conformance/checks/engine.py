"""L5 engine: greedy tokens of a tiny random Llama through the whole engine on the backend
equal those of the CPU backend, plainly, with prefix-cache hits and with preemption."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from crossinfer.backend import KVCacheSpec
from crossinfer_conformance.cases import Case
from crossinfer_conformance.checks.tiny_model import NUM_SPECIAL, VOCAB_SIZE, build_tiny_model
from crossinfer_conformance.outcome import CheckFailed, NotSupported

if TYPE_CHECKING:
    from crossinfer_conformance.context import CheckContext

# Small limits, so that a compiled-graph backend's warm-up has few shapes to compile.
MAX_MODEL_LEN = 256
MAX_NUM_BATCHED_TOKENS = 256
MAX_NUM_SEQS = 16
ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class EngineRun:
    """The greedy tokens of one engine over a list of prompts, and its counters."""

    tokens: list[list[int]]
    prefix_hit_tokens: int
    preemptions: int


def check_engine_greedy(ctx: CheckContext, case: Case) -> None:
    """Prompts of a few lengths, prefix caching off."""
    gen = ctx.generator(case.id)
    prompts = [_prompt(gen, n) for n in (5, 17, 30)]
    _compare(ctx, prompts, 12, enable_prefix_caching=False)


def check_engine_prefix_cache(ctx: CheckContext, case: Case) -> None:
    """Prompts sharing two full blocks: later ones hit the first one's cached blocks."""
    gen = ctx.generator(case.id)
    shared = _prompt(gen, 2 * _block_size(ctx, ctx.info.name) + 3)
    prompts = [shared + _prompt(gen, 4 + i) for i in range(3)]
    run = _compare(ctx, prompts, 10, enable_prefix_caching=True)
    if run.prefix_hit_tokens == 0:
        raise CheckFailed("the prompts share two full blocks, yet the engine had no prefix hit")


def check_engine_preemption(ctx: CheckContext, case: Case) -> None:
    """A KV cache of four blocks for three requests that grow to three blocks each: two are
    admitted, both outgrow the cache, one is preempted and recomputed, and the tokens do not
    change."""
    gen = ctx.generator(case.id)
    block_size = _block_size(ctx, ctx.info.name)
    prompts = [_prompt(gen, block_size + 4) for _ in range(3)]
    run = _compare(ctx, prompts, block_size, kv_blocks=4)
    if run.preemptions == 0:
        raise CheckFailed("four KV blocks for three requests of three blocks, yet no preemption")


def _prompt(gen: torch.Generator, length: int) -> list[int]:
    return torch.randint(NUM_SPECIAL, VOCAB_SIZE, (length,), generator=gen).tolist()


def _compare(
    ctx: CheckContext, prompts: list[list[int]], max_tokens: int, **engine_args: Any
) -> EngineRun:
    ours = _generate(ctx, ctx.info.name, prompts, max_tokens, **engine_args)
    ref = _generate(ctx, "cpu", prompts, max_tokens, **engine_args)
    for i, (got, want) in enumerate(zip(ours.tokens, ref.tokens, strict=True)):
        if got != want:
            at = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), 0)
            raise CheckFailed(
                f"greedy tokens differ from the CPU backend's: prompt {i} ({len(prompts[i])} "
                f"tokens) diverges at generated token {at}: got {got[at : at + 4]}..., "
                f"CPU gave {want[at : at + 4]}... ({len(prompts)} prompts, "
                f"{ours.prefix_hit_tokens} prefix-hit tokens, {ours.preemptions} preemptions)"
            )
    return ours


def _generate(
    ctx: CheckContext,
    device: str,
    prompts: list[list[int]],
    max_tokens: int,
    kv_blocks: int = 64,
    enable_prefix_caching: bool = True,
) -> EngineRun:
    from crossinfer import LLM, SamplingParams

    loaded = _loaded(ctx, device)
    block_size = _block_size(ctx, device)
    assert ctx.info.caps is not None
    if device == ctx.info.name and ctx.info.caps.static_shapes:
        kv_blocks += 1  # a compiled backend's sink block holds no sequence
    args = loaded.model.args
    spec = KVCacheSpec(args.num_layers, args.num_kv_heads, args.head_dim, block_size, loaded.dtype)
    llm = LLM(
        device=device,
        loaded=loaded,
        block_size=block_size,
        kv_cache_memory=kv_blocks * spec.bytes_per_block,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_num_seqs=MAX_NUM_SEQS,
        enable_prefix_caching=enable_prefix_caching,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    scheduler = llm.engine.scheduler
    return EngineRun(
        tokens=[list(o.outputs[0].token_ids) for o in outputs],
        prefix_hit_tokens=scheduler.kv_cache.num_prefix_hit_tokens,
        preemptions=scheduler.num_preemptions,
    )


def _loaded(ctx: CheckContext, device: str) -> Any:
    from crossinfer.engine.setup import EngineConfig, load_model

    key = f"engine-model-{device}"
    if key not in ctx.memo:
        ctx.memo[key] = load_model(
            EngineConfig(model=str(_folder(ctx)), device=device, dtype=_dtype(ctx))
        )
    return ctx.memo[key]


def _folder(ctx: CheckContext) -> Path:
    if "engine-folder" not in ctx.memo:
        caps = ctx.backend.capabilities()
        head = 64 if 64 in caps.head_sizes else caps.head_sizes[0]
        folder = ctx.run_dir / "tiny-llama"
        if not (folder / "config.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            build_tiny_model(folder, head, ctx.seed)
        ctx.memo["engine-folder"] = folder
    folder_path: Path = ctx.memo["engine-folder"]
    return folder_path


def _dtype(ctx: CheckContext) -> str:
    # fp32 when the backend has it: greedy choices of two correct backends then agree.
    assert ctx.info.caps is not None
    dtypes = ctx.info.caps.dtypes
    name = "fp32" if "fp32" in dtypes else dtypes[0]
    if name not in ENGINE_DTYPES:
        raise NotSupported(f"the engine cannot load a model in {name}")
    return ENGINE_DTYPES[name]


def _block_size(ctx: CheckContext, device: str) -> int:
    caps = ctx.backend.capabilities()
    if (
        device == ctx.info.name
        or caps.default_block_size in ctx.reference.capabilities().block_sizes
    ):
        return caps.default_block_size
    return ctx.reference.capabilities().default_block_size
