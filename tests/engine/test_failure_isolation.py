"""A failure inside the engine belongs to the request that caused it: that request ends with an
error and its blocks are freed, and everyone else in the same batch gets the tokens they
would have got without it. Only a lost device stops the engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from crossinfer import LLM, SamplingParams
from crossinfer.engine.async_engine import AsyncLLMEngine, EngineDeadError, GenerateRequest
from crossinfer.engine.errors import EngineFatalError, RequestError, RequestFailedError
from crossinfer.engine.outputs import RequestOutput
from crossinfer_conformance.checks.tiny_model import build_tiny_model

POISON = 77  # the token id the planted faults react to
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7, 8, 9], "c": [40, 41, 42, 43, 44, 45, 46]}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), head_size=16, seed=3)


@pytest.fixture
def llm(tiny_folder: Path) -> LLM:
    return LLM(model=str(tiny_folder), device="cpu", kv_cache_memory=4 << 20, max_model_len=256)


class Poisoned(torch.nn.Module):
    """The model, but a forward pass whose input holds POISON raises (``mode="raise"``) or
    returns NaN for those rows (``mode="nan"``)."""

    def __init__(self, model: Any, mode: str) -> None:
        super().__init__()
        self.inner = model
        self.mode = mode
        self.args = model.args
        self.compute_logits = model.compute_logits

    def forward(self, input_ids: torch.Tensor, *rest: Any) -> torch.Tensor:
        hidden = self.inner(input_ids, *rest)
        poisoned = input_ids == POISON
        if poisoned.any() and self.mode == "raise":
            raise RuntimeError("planted fault at /secret/path/model.py")
        return hidden.masked_fill(poisoned[:, None], float("nan"))


def run(
    llm: LLM, prompts: dict[str, list[int]], params: dict[str, SamplingParams]
) -> dict[str, RequestOutput]:
    """Add every request, step until done; the final output of each."""
    engine = llm.engine
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params.get(request_id, GREEDY))
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    return final


def assert_all_blocks_free(llm: LLM) -> None:
    kv = llm.engine.scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def tokens(output: RequestOutput) -> tuple[int, ...]:
    return output.outputs[0].token_ids


@pytest.fixture
def reference(tiny_folder: Path) -> dict[str, tuple[int, ...]]:
    """What a and c generate with nobody else in the batch."""
    clean = LLM(model=str(tiny_folder), device="cpu", kv_cache_memory=4 << 20, max_model_len=256)
    return {rid: tokens(out) for rid, out in run(clean, PROMPTS, {}).items()}


def _poison_at_first_token() -> SamplingParams:
    # b's first sampled token is POISON, so its first decode step (batched with a and c)
    # carries the fault.
    return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={POISON: 100})


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_forward_pass_failing_for_one_request_fails_it_alone(
    llm: LLM, reference: dict[str, tuple[int, ...]], when: str
) -> None:
    llm.engine.runner.model = Poisoned(llm.engine.runner.model, "raise")  # type: ignore[assignment]
    prompts = {**PROMPTS, "b": [POISON, 3, 4] if when == "prefill" else [10, 11, 12]}
    params = {} if when == "prefill" else {"b": _poison_at_first_token()}
    out = run(llm, prompts, params)
    failed = out["b"]
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert failed.error is not None and "internal error" in failed.error
    assert "secret" not in failed.error and "planted" not in failed.error  # nothing leaks
    assert {rid: tokens(out[rid]) for rid in PROMPTS} == reference
    assert all(out[rid].error is None for rid in PROMPTS)
    assert_all_blocks_free(llm)
    assert tokens(run(llm, {"d": PROMPTS["a"]}, {})["d"]) == reference["a"]  # still serving


def test_logits_without_a_finite_value_fail_that_request_without_a_rerun(
    llm: LLM, reference: dict[str, tuple[int, ...]]
) -> None:
    poisoned = Poisoned(llm.engine.runner.model, "nan")
    calls = 0
    forward = poisoned.forward

    def counting(*args: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return forward(*args)

    poisoned.forward = counting  # type: ignore[method-assign]
    llm.engine.runner.model = poisoned  # type: ignore[assignment]
    out = run(llm, {**PROMPTS, "b": [3, 4, POISON]}, {})
    assert out["b"].error is not None and "no finite value" in out["b"].error
    assert {rid: tokens(out[rid]) for rid in PROMPTS} == reference
    assert calls == 8  # one forward pass per step: the others were sampled without a rerun
    assert_all_blocks_free(llm)


def test_scheduling_failing_for_one_request_fails_it_alone(
    llm: LLM, reference: dict[str, tuple[int, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = llm.engine.scheduler.kv_cache
    lookup = kv.find_cached_prefix

    def failing_lookup(token_ids: Any, *keys: Any) -> Any:
        if POISON in token_ids:
            raise KeyError("planted bookkeeping fault")
        return lookup(token_ids, *keys)

    monkeypatch.setattr(kv, "find_cached_prefix", failing_lookup)
    out = run(llm, {**PROMPTS, "b": [POISON, 1, 2]}, {})
    assert out["b"].outputs[0].finish_reason == "error" and "planted" not in str(out["b"].error)
    assert {rid: tokens(out[rid]) for rid in PROMPTS} == reference
    assert_all_blocks_free(llm)


def test_detokenizing_failing_for_one_request_fails_it_alone(
    llm: LLM, reference: dict[str, tuple[int, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = llm.engine
    for request_id, prompt in {**PROMPTS, "b": [20, 21]}.items():
        engine.add_request(request_id, prompt, GREEDY)
    sample = engine.processor._groups["b"].samples[0]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "planted")

    monkeypatch.setattr(sample.detokenizer, "step", broken)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final["b"].outputs[0].finish_reason == "error"
    assert {rid: tokens(final[rid]) for rid in PROMPTS} == reference
    assert_all_blocks_free(llm)


def test_the_offline_api_raises_for_a_failed_request(llm: LLM) -> None:
    llm.engine.runner.model = Poisoned(llm.engine.runner.model, "raise")  # type: ignore[assignment]
    with pytest.raises(RequestFailedError, match="internal error"):
        llm.generate([PROMPTS["a"], [POISON, 2]], GREEDY)
    assert_all_blocks_free(llm)


def test_a_lost_device_stops_the_engine(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    llm.engine.runner.model = Poisoned(llm.engine.runner.model, "raise")  # type: ignore[assignment]

    def lost() -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine.runner.backend, "synchronize", lost)
    llm.engine.add_request("b", [POISON, 1], GREEDY)
    with pytest.raises(EngineFatalError, match="stopped working"):
        llm.engine.step()


# -- through the async engine (what the server runs) ------------------------------------


@pytest.fixture
def async_engine(llm: LLM) -> Iterator[AsyncLLMEngine]:
    stops: list[BaseException] = []
    engine = AsyncLLMEngine(llm.engine, on_stop=stops.append)
    engine.stops = stops  # type: ignore[attr-defined]
    yield engine
    engine.shutdown()


def test_a_failed_request_ends_its_stream_with_an_error_and_the_rest_go_on(
    async_engine: AsyncLLMEngine, reference: dict[str, tuple[int, ...]]
) -> None:
    runner = async_engine.engine.runner
    runner.model = Poisoned(runner.model, "raise")  # type: ignore[assignment]

    async def collect(request_id: str, prompt: list[int]) -> Any:
        stream = await async_engine.add_requests([GenerateRequest(request_id, prompt, GREEDY)])
        last = None
        try:
            async for output in stream:
                last = output
        except RequestFailedError as exc:
            return exc
        assert last is not None
        return tokens(last)

    async def main() -> list[Any]:
        return await asyncio.gather(
            collect("a", PROMPTS["a"]), collect("b", [POISON, 5]), collect("c", PROMPTS["c"])
        )

    a, b, c = asyncio.run(main())
    assert isinstance(b, RequestFailedError) and b.request_id == "b"
    assert (a, c) == (reference["a"], reference["c"])
    assert async_engine.is_healthy and async_engine.stops == []  # type: ignore[attr-defined]


def test_a_broken_engine_tells_every_waiter_and_its_owner(
    async_engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = async_engine.engine.runner
    runner.model = Poisoned(runner.model, "raise")  # type: ignore[assignment]

    def lost() -> None:
        raise RuntimeError("device lost at /secret/path")

    monkeypatch.setattr(runner.backend, "synchronize", lost)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> tuple[BaseException | None, BaseException | None]:
        stream = await async_engine.add_requests([GenerateRequest("a", PROMPTS["a"], long)])
        await anext(stream)
        await async_engine.add_requests([GenerateRequest("b", [POISON], GREEDY)])
        caught = None
        try:
            async for _ in stream:
                pass
        except EngineDeadError as exc:
            caught = exc
        try:
            await async_engine.add_requests([GenerateRequest("c", [1], GREEDY)])
        except EngineDeadError as exc:
            return caught, exc
        return caught, None

    running_error, add_error = asyncio.run(main())
    assert isinstance(running_error, EngineDeadError) and isinstance(add_error, EngineDeadError)
    assert not async_engine.is_healthy
    reason = async_engine.stop_reason or ""
    assert "stopped working" in reason and "secret" not in reason
    assert [type(e) for e in async_engine.stops] == [EngineFatalError]  # type: ignore[attr-defined]


def test_a_failure_while_adding_refuses_that_request_alone(
    async_engine: AsyncLLMEngine,
    reference: dict[str, tuple[int, ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = async_engine.engine
    add = engine.add_request

    def failing_add(request_id: str, *args: Any, **kwargs: Any) -> None:
        if request_id == "b":
            raise MemoryError("planted")
        add(request_id, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", failing_add)

    async def main() -> tuple[Any, tuple[int, ...]]:
        try:
            await async_engine.add_requests([GenerateRequest("b", [1, 2], GREEDY)])
            refused: Any = None
        except RequestError as exc:
            refused = exc
        stream = await async_engine.add_requests([GenerateRequest("a", PROMPTS["a"], GREEDY)])
        last = [output async for output in stream][-1]
        return refused, tokens(last)

    refused, a = asyncio.run(main())
    assert isinstance(refused, RequestError) and "planted" not in str(refused)
    assert a == reference["a"] and async_engine.is_healthy
