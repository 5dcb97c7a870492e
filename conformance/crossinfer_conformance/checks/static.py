"""Cases for backends that declare static shapes (contract 1.2): a padded step attends as the
unpadded one does, padded writes land only in the sink, and after the engine's warm-up nothing
compiles again. A dynamic backend records them as not supported."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from crossinfer.backend import EngineLimits, KVCacheSpec, StaticShapes
from crossinfer.engine.batch import build_attention_batch
from crossinfer.engine.request import Request
from crossinfer.engine.scheduler import ScheduledChunk
from crossinfer.engine.static_batch import StepShape
from crossinfer.sampling_params import SamplingParams
from crossinfer_conformance import sentinels
from crossinfer_conformance.cases import KV_HEADS, Case
from crossinfer_conformance.checks.attention import check_attention
from crossinfer_conformance.checks.paged import Layout, random_layout, read_back
from crossinfer_conformance.compare import assert_close
from crossinfer_conformance.kv_write import write
from crossinfer_conformance.outcome import CheckFailed, NotSupported

if TYPE_CHECKING:
    from crossinfer_conformance.context import CheckContext

# The limits the kernel-level cases ask the backend's buckets for.
KERNEL_LIMITS = EngineLimits(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256,
                             block_size=16)  # fmt: skip


def static_shapes(ctx: CheckContext, limits: EngineLimits) -> StaticShapes:
    shapes = ctx.backend.static_shapes(limits)
    if shapes is None:
        raise NotSupported("a dynamic backend: it declares no static shapes")
    return shapes


def _chunks(case: Case, layout: Layout) -> list[ScheduledChunk]:
    """The case's sequences as the scheduler hands them to the runner."""
    params = SamplingParams(max_tokens=1)
    chunks = []
    for i, (cached, new) in enumerate(case.seqs):
        request = Request(f"s{i}", [0] * (cached + new), params, 1)
        chunks.append(ScheduledChunk(request, cached, new, layout.tables[i]))
    return chunks


def _padded_layout(ctx: CheckContext, case: Case, shapes: StaticShapes) -> Layout:
    """A random layout whose blocks avoid the sink block (the block pool never hands it out)."""
    gen = ctx.generator(case.id)
    layout = random_layout([c + n for c, n in case.seqs], case.block_size, gen)
    shift = [b if b < shapes.pad_block else b + 1 for t in layout.tables for b in t]
    tables, at = [], 0
    for t in layout.tables:
        tables.append(tuple(shift[at : at + len(t)]))
        at += len(t)
    return Layout(layout.block_size, layout.num_blocks + 1, tuple(tables), layout.seq_lens)


def check_static_padded(ctx: CheckContext, case: Case) -> None:
    """Attention over the engine's padded form of a mixed batch equals, on its real tokens,
    the backend's attention over the exact batch."""
    from crossinfer.engine.static_batch import build_padded_step
    from crossinfer_conformance.context import torch_dtype

    shapes = static_shapes(ctx, KERNEL_LIMITS)
    dtype = torch_dtype(case.dtype)
    gen = ctx.generator(case.id)
    layout = _padded_layout(ctx, case, shapes)
    backend, device = ctx.backend, ctx.device()
    spec = KVCacheSpec(1, KV_HEADS, case.head_size, case.block_size, dtype)
    (cache,) = backend.allocate_kv_cache(spec, layout.num_blocks)
    total = sum(layout.seq_lens)
    keys = torch.randn(total, KV_HEADS, case.head_size, generator=gen).to(dtype).to(device)
    values = torch.randn(total, KV_HEADS, case.head_size, generator=gen).to(dtype).to(device)
    cache = write(backend, keys, values, cache, layout.context_slots().to(device))
    chunks = _chunks(case, layout)
    step = build_padded_step(chunks, shapes, case.block_size, device)
    real = sum(n for _, n in case.seqs)
    exact_batch = build_attention_batch(
        [n for _, n in case.seqs],
        list(layout.seq_lens),
        [list(t) for t in layout.tables],
        case.block_size,
        device,
    )
    query = torch.randn(step.shape.num_tokens, case.num_heads, case.head_size, generator=gen)
    query = query.to(dtype).to(device)
    scale = case.head_size**-0.5
    padded_out = backend.attention(query, cache, step.batch, scale)
    exact_out = backend.attention(query[:real], cache, exact_batch, scale)
    backend.synchronize()
    if tuple(padded_out.shape) != tuple(query.shape):
        raise CheckFailed(f"attention over a padded batch returned shape {tuple(padded_out.shape)}")
    if not bool(torch.isfinite(padded_out.float()).all()):
        raise CheckFailed("attention gave non-finite values for the padded tokens")
    assert_close(padded_out[:real].cpu(), exact_out.cpu(), case.dtype, "padded attention")


def check_static_sink(ctx: CheckContext, case: Case) -> None:
    """The padded step's writes change the real tokens' slots and the sink block's, nothing
    else."""
    from crossinfer.engine.static_batch import build_padded_step
    from crossinfer_conformance.context import torch_dtype

    shapes = static_shapes(ctx, KERNEL_LIMITS)
    dtype = torch_dtype(case.dtype)
    gen = ctx.generator(case.id)
    layout = _padded_layout(ctx, case, shapes)
    backend, device = ctx.backend, ctx.device()
    bs = case.block_size
    spec = KVCacheSpec(1, KV_HEADS, case.head_size, bs, dtype)
    (cache,) = backend.allocate_kv_cache(spec, layout.num_blocks)
    num_slots = layout.num_blocks * bs
    cache = sentinels.fill(backend, cache, (num_slots, KV_HEADS, case.head_size), dtype)
    step = build_padded_step(_chunks(case, layout), shapes, bs, device)
    num_tokens = step.shape.num_tokens
    keys = torch.randn(num_tokens, KV_HEADS, case.head_size, generator=gen).to(dtype)
    cache = write(backend, keys.to(device), (-keys).to(device), cache, step.batch.slot_mapping)
    backend.synchronize()
    every = torch.arange(num_slots, dtype=torch.int64)
    stored_k, stored_v = read_back(backend, cache, every)
    real = step.batch.slot_mapping[: sum(n for _, n in case.seqs)].tolist()
    sink = range(shapes.pad_block * bs, (shapes.pad_block + 1) * bs)
    if set(real) & set(sink):
        raise CheckFailed("the padded step put a real token in the sink block")
    stray = sentinels.changed_slots(stored_k, stored_v, [*real, *sink])
    if stray:
        where = sentinels.describe_slots(stray, real, bs)
        raise CheckFailed(f"padded writes reached slots outside the sink: {where}")
    index = torch.tensor(real)
    if not torch.equal(stored_k[index], keys[: len(real)]):
        raise CheckFailed("the real tokens' keys were not stored by the padded step")


def check_static_no_recompile(ctx: CheckContext, case: Case) -> None:
    """The engine compiles every shape in its warm-up, then a mixed workload (prefills,
    decodes, prefix-cache hits, prompt logprobs) compiles nothing more; and its steps keep
    what the backend declared (prefill and decode apart, decodes at the decode buckets)."""
    from crossinfer import LLM, SamplingParams
    from crossinfer.engine.errors import RecompileError
    from crossinfer_conformance.checks.engine import _block_size, _loaded, _prompt

    static_shapes(ctx, KERNEL_LIMITS)
    loaded = _loaded(ctx, ctx.info.name)
    llm = LLM(
        device=ctx.info.name,
        loaded=loaded,
        block_size=_block_size(ctx, ctx.info.name),
        max_model_len=KERNEL_LIMITS.max_model_len,
        max_num_batched_tokens=KERNEL_LIMITS.max_num_batched_tokens,
        max_num_seqs=KERNEL_LIMITS.max_num_seqs,
        fail_on_recompile=True,
    )
    warmed = ctx.backend.compiled_graph_count()
    if not warmed:
        raise CheckFailed("the backend declares static shapes but counted no compiled graph")
    steps = _record_steps(llm)
    gen = ctx.generator(case.id)
    shared = _prompt(gen, 40)
    prompts = [shared + _prompt(gen, n) for n in (1, 9, 23)] + [_prompt(gen, n) for n in (3, 60)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12 + i, ignore_eos=True,
                       prompt_logprobs=1 if i == 2 else None)
        for i in range(len(prompts))
    ]  # fmt: skip
    try:
        llm.generate(prompts, params)
    except RecompileError as exc:
        raise CheckFailed(f"compiled after warm-up: {exc}") from exc
    count = ctx.backend.compiled_graph_count()
    if count != warmed:
        raise CheckFailed(f"{count - (warmed or 0)} graphs compiled after warm-up")
    _check_steps(steps, llm.engine.runner.static)


def _record_steps(llm: Any) -> list[tuple[frozenset[bool], StepShape]]:
    """Each step's kinds of chunk (decode or not) and the shape it runs at, as scheduled."""
    from crossinfer.engine.static_batch import step_shape

    scheduler, shapes = llm.engine.scheduler, llm.engine.runner.static
    schedule = scheduler.schedule
    steps: list[tuple[frozenset[bool], StepShape]] = []

    def recording() -> Any:
        output = schedule()
        if output.chunks:
            kinds = frozenset(c.is_decode for c in output.chunks)
            steps.append((kinds, step_shape(output.chunks, shapes)))
        return output

    scheduler.schedule = recording
    return steps


def _check_steps(steps: list[tuple[frozenset[bool], StepShape]], shapes: StaticShapes) -> None:
    """What the backend declared about its steps held over the workload."""
    kinds = {kind for kind, _ in steps}
    if not {frozenset({True}), frozenset({False})} <= kinds:
        raise CheckFailed(f"the workload did not run both decode and prefill steps: {kinds}")
    if shapes.split_prefill_decode and frozenset({True, False}) in kinds:
        mixed = sum(1 for kind, _ in steps if len(kind) == 2)
        raise CheckFailed(f"{mixed} steps mixed prefill and decode (split_prefill_decode)")
    if shapes.decode_buckets:
        wrong = {s for kind, s in steps if kind == {True} and s.num_tokens != s.num_seqs}
        if wrong:
            raise CheckFailed(f"decode steps ran outside the decode buckets: {sorted(wrong)}")


def check_native_attention(ctx: CheckContext, case: Case) -> None:
    """The backend's own attention kernel runs (not a reference stand-in)."""
    if not ctx.backend.capabilities().native_attention:
        raise NotSupported(
            "the backend's attention kernel runs only on its hardware; this run uses the "
            "reference static-shape ops in its place"
        )
    check_attention(ctx, case)
