"""The engine on a compiled-graph backend (contract 1.2): padded steps equal unpadded ones,
padded writes touch only the sink, greedy tokens equal the dynamic CPU backend's through
prefix-cache hits, chunked prefill and preemption, and after warm-up nothing compiles again
over a mixed workload of more than 100 steps, with an exact graph count."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from crossinfer import LLM, SamplingParams
from crossinfer.backend import StaticShapes
from crossinfer.engine.batch import build_attention_batch
from crossinfer.engine.kv_cache import KVCacheManager
from crossinfer.engine.request import Request
from crossinfer.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from crossinfer.engine.setup import EngineConfig, load_model
from crossinfer.engine.static_batch import StepShape, all_shapes, build_padded_step, step_shape
from crossinfer_conformance.checks.tiny_model import build_tiny_model
from crossinfer_cpu import CpuBackend
from crossinfer_xla import static_ops
from crossinfer_xla.static_ops import SPLIT
from tests.engine.static_backend import StaticCpuBackend

BLOCK = 4
SHAPES = StaticShapes(
    token_buckets=(8, 16, 32), seq_buckets=(2, 4), block_table_widths=(4, 8), pad_block=0
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), head_size=16, seed=11)


def _chunks() -> tuple[Any, ...]:
    """A step with a prefix-cache hit, a chunked prefill and a decode, from a real scheduler."""
    kv = KVCacheManager(40, BLOCK, reserved=frozenset({0}))
    scheduler = Scheduler(SchedulerConfig(4, 12, 32), kv)
    params = SamplingParams(max_tokens=4)
    shared = list(range(3, 12))
    first = Request("a", shared + [20], params, 4)
    scheduler.add(first)
    scheduler.advance(scheduler.schedule())  # a: 10 tokens, blocks cached
    first.token_ids.append(30)  # its first sampled token: a decodes next
    scheduler.add(Request("b", shared + [21, 22], params, 4))  # hits a's two full blocks
    scheduler.add(Request("c", list(range(40, 60)), params, 4))  # chunked by the budget
    return scheduler.schedule().chunks


def test_a_padded_step_holds_the_same_tokens_at_bucket_shapes() -> None:
    chunks = _chunks()
    assert [c.request.request_id for c in chunks] == ["a", "b", "c"]
    assert chunks[1].num_computed_tokens == 8  # the prefix-cache hit
    step = build_padded_step(chunks, SHAPES, BLOCK, torch.device("cpu"))
    real = sum(c.num_new_tokens for c in chunks)
    assert step.shape == step_shape(chunks, SHAPES)
    assert (step.input_ids.shape[0], step.batch.num_seqs, step.batch.block_table.shape[1]) == (
        step.shape.num_tokens,
        step.shape.num_seqs,
        step.shape.width,
    )
    assert step.shape.num_tokens == 16 and real <= 16 and step.shape.num_seqs == 4
    # Padded tokens write into the sink; padded sequences are empty, with sink rows.
    sink = range(SHAPES.pad_block * BLOCK, (SHAPES.pad_block + 1) * BLOCK)
    assert all(s in sink for s in step.batch.slot_mapping[real:].tolist())
    assert step.batch.seq_lens[3:].tolist() == [0] and (step.batch.block_table[3] == 0).all()
    assert (step.batch.max_query_len, step.batch.max_seq_len) == (16, step.shape.width * BLOCK)
    assert step.shape.width == 4  # the narrower width holds every sequence here
    assert step.batch.query_lens_cpu == step.batch.seq_lens_cpu == ()
    assert step.num_sampling == 2  # a (decode) and b (whole prompt); c is mid-prefill


def test_decode_buckets_shape_steps_of_one_token_per_sequence() -> None:
    shapes = StaticShapes(
        token_buckets=(8, 16), seq_buckets=(1, 2, 4), block_table_widths=(4,),
        decode_buckets=(1, 2, 4),
    )  # fmt: skip
    params = SamplingParams(max_tokens=4)
    decodes = [ScheduledChunk(Request(f"d{i}", [1] * 6, params, 4), 5, 1, (1, 2)) for i in range(3)]
    prefill = ScheduledChunk(Request("p", [1] * 6, params, 4), 0, 6, (3, 4))
    assert step_shape(decodes, shapes) == StepShape(4, 4, 4)
    assert step_shape(decodes[:1], shapes) == StepShape(1, 1, 4)
    assert step_shape([*decodes, prefill], shapes) == StepShape(16, 4, 4)
    step = build_padded_step(decodes, shapes, BLOCK, torch.device("cpu"))
    assert step.batch.token_seq.tolist() == [0, 1, 2, 3]  # the pad token in the pad slot
    assert step.batch.slot_mapping[3] // BLOCK == 0  # and it writes into the sink
    warm = all_shapes(shapes)
    assert warm[:3] == [StepShape(1, 1, 4), StepShape(2, 2, 4), StepShape(4, 4, 4)]
    assert len(warm) == len(set(warm)) == 3 + 2 + 2 + 2


def test_padded_attention_equals_the_unpadded_cpu_backend() -> None:
    torch.manual_seed(0)
    chunks = _chunks()
    cpu = CpuBackend()
    spec_heads, head = 2, 16
    cache = torch.randn(2, 40, BLOCK, spec_heads, head)  # every context slot holds a value
    padded = build_padded_step(chunks, SHAPES, BLOCK, torch.device("cpu"))
    exact = build_attention_batch(
        [c.num_new_tokens for c in chunks],
        [c.num_computed_tokens + c.num_new_tokens for c in chunks],
        [c.block_ids for c in chunks],
        BLOCK,
        torch.device("cpu"),
    )
    real = exact.num_tokens
    query = torch.randn(padded.shape.num_tokens, 4, head)  # GQA: 4 query heads, 2 KV heads
    want = cpu.attention(query[:real], cache, exact, 0.25)
    got = static_ops.attention(SPLIT, query, cache, padded.batch, 0.25)
    torch.testing.assert_close(got[:real], want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()  # padded tokens too
    derived = static_ops.attention(SPLIT, query[:real], cache, exact, 0.25)  # no token_seq
    torch.testing.assert_close(derived, want, atol=1e-5, rtol=1e-5)


def test_padded_writes_touch_only_the_sink() -> None:
    chunks = _chunks()
    step = build_padded_step(chunks, SHAPES, BLOCK, torch.device("cpu"))
    cache = torch.zeros(2, 40, BLOCK, 2, 16)
    keys = torch.randn(step.shape.num_tokens, 2, 16)
    new = static_ops.write_kv(SPLIT, keys, -keys, cache, step.batch.slot_mapping, in_place=False)
    changed = (new != cache).flatten(1, 2).flatten(2).any(dim=-1).any(dim=0)  # [slots]
    real = exact_slots = set(
        step.batch.slot_mapping[: sum(c.num_new_tokens for c in chunks)].tolist()
    )
    assert set(changed.nonzero().flatten().tolist()) <= real | set(range(0, BLOCK))
    assert (cache == 0).all()  # functional: the old cache is untouched
    assert exact_slots.isdisjoint(range(0, BLOCK))  # no real token lives in the sink


def _llm(folder: Path, backend: Any, **engine_args: Any) -> LLM:
    config = EngineConfig(model=str(folder), **engine_args)
    loaded = load_model(config, backend) if backend is not None else None
    return LLM(model=str(folder), device="cpu", loaded=loaded, **engine_args)


WORKLOAD = [
    "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17",
    "w5 w6 w7 w8 w9 w10 w11 w12 w20 w21",  # shares two blocks with the first
    "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50 w51 w52 w53 w54 w55 w56 w57 w58 w59 w60",
    "w99",
    "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w70",
]


@pytest.mark.parametrize(
    ("split", "decode_buckets"),
    [(False, False), (True, False), (True, True)],
    ids=["mixed-steps", "split-prefill-decode", "split-with-decode-buckets"],
)
def test_greedy_tokens_equal_the_dynamic_cpu_backend(
    folder: Path, split: bool, decode_buckets: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A token budget of 16 chunks the long prompt; 13 blocks of 8 (2 layers x K and V x 8
    # slots x 1 head x 16 x 4 bytes each) force preemption.
    args = {"max_model_len": 64, "max_num_batched_tokens": 16, "max_num_seqs": 4,
            "block_size": 8, "kv_cache_memory": 13 * 2 * 2 * 8 * 16 * 4}  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = _llm(folder, None, **args).generate(WORKLOAD, params)
    static = StaticCpuBackend(split_prefill_decode=split, decode_buckets=decode_buckets)
    llm = _llm(folder, static, **args, fail_on_recompile=True)
    steps = _record_steps(monkeypatch)
    got = llm.generate(WORKLOAD, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.kv_cache.num_prefix_hit_tokens > 0
    kinds = [kind for kind, _ in steps]
    assert {frozenset({True}), frozenset({False})} <= set(kinds)  # decode and prefill steps
    assert not split or all(len(k) == 1 for k in kinds)  # split: no step mixes the two
    decodes = [shape for kind, shape in steps if kind == {True}]
    # Decode buckets: n tokens for n sequences; else a token bucket (8 at least) for 2 or 4.
    assert decodes and all((s.num_tokens == s.num_seqs) == decode_buckets for s in decodes)


def _record_steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """Each padded step's kinds of chunk (decode or not, taken as it is built) and shape."""
    from crossinfer.engine import runner

    steps: list[tuple[Any, Any]] = []
    build = runner.build_padded_step

    def recording(chunks: Any, *args: Any, **kwargs: Any) -> Any:
        step = build(chunks, *args, **kwargs)
        if chunks:  # not a warm-up step
            steps.append((frozenset(c.is_decode for c in chunks), step.shape))
        return step

    monkeypatch.setattr(runner, "build_padded_step", recording)
    return steps


def test_no_recompile_after_warm_up_over_a_mixed_workload(folder: Path) -> None:
    static = StaticCpuBackend()
    args = {"max_model_len": 64, "max_num_batched_tokens": 32, "max_num_seqs": 8,
            "block_size": 8, "fail_on_recompile": True}  # fmt: skip
    llm = _llm(folder, static, **args)
    shapes = static.static_shapes(llm.engine.runner.static and _limits(llm))
    warmed = static.graphs
    assert warmed == len(all_shapes(shapes))  # one graph per shape, each compiled once
    rng = random.Random(3)
    engine = llm.engine
    steps = 0
    for i in range(50):  # requests arrive while others run: every kind of step
        words = " ".join(f"w{rng.randrange(3, 250)}" for _ in range(rng.randint(1, 40)))
        params = SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randint(1, 20),
                                ignore_eos=True, n=rng.choice([1, 1, 2]), seed=i)  # fmt: skip
        engine.add_request(str(i), words, params)
        for _ in range(rng.randint(0, 4)):
            if engine.has_unfinished_requests():
                engine.step()
                steps += 1
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert steps >= 100
    assert static.graphs == warmed  # fail_on_recompile would have raised too
    assert static.compile_cache_dir is not None and "static-cpu" in static.compile_cache_dir
    assert static.steps[-2:] == ["begin", "end"] and static.steps.count("begin") == len(
        [s for s in static.steps if s == "end"]
    )
    kv = engine.scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_blocks  # the sink is not among them
    assert 0 not in kv.pool.free_block_ids()


def _limits(llm: LLM) -> Any:
    from crossinfer.backend import EngineLimits

    config = llm.engine.scheduler.config
    return EngineLimits(
        config.max_num_batched_tokens, config.max_num_seqs, config.max_model_len,
        llm.engine.runner.block_size,
    )  # fmt: skip
