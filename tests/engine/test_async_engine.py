"""AsyncLLMEngine on SmolLM2: streaming, refusals, aborts on close, idling and shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from crossinfer import LLM, SamplingParams
from crossinfer.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    GenerateRequest,
)
from crossinfer.engine.setup import EngineConfig, LoadedModel

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _config() -> EngineConfig:
    return EngineConfig(device="cpu", max_model_len=256, kv_cache_memory=32 << 20)


@pytest.fixture(scope="module")
def engine(smollm2_loaded: LoadedModel) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine.from_config(_config(), smollm2_loaded)
    yield engine
    engine.shutdown()


def _wait_idle(engine: AsyncLLMEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_blocks:
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine did not become idle: {engine.stats()}")


def test_generate_streams_the_offline_result(
    engine: AsyncLLMEngine, smollm2_loaded: LoadedModel
) -> None:
    async def stream() -> list[str]:
        return [o.outputs[0].delta async for o in engine.generate("g", "The sky is", GREEDY)]

    deltas = asyncio.run(stream())
    llm = LLM(device="cpu", loaded=smollm2_loaded, max_model_len=256, kv_cache_memory=32 << 20)
    (offline,) = llm.generate("The sky is", GREEDY)
    assert len(deltas) == 6  # one output per step, one token each
    assert "".join(deltas) == offline.outputs[0].text
    _wait_idle(engine)


def test_refusals_raise_and_leave_nothing_behind(engine: AsyncLLMEngine) -> None:
    async def add(prompt: str | list[int]) -> None:
        await engine.add_requests([GenerateRequest("r", prompt, GREEDY)])

    with pytest.raises(ValueError, match="maximum context length is 256"):
        asyncio.run(add("word " * 300))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(add([1, 10**7]))
    engine.max_waiting = 0
    try:
        with pytest.raises(ValueError, match="more than the 0 that may ever wait"):
            asyncio.run(add("Hello"))
    finally:
        engine.max_waiting = 512
    _wait_idle(engine)


def test_a_full_waiting_queue_refuses_with_overloaded(smollm2_loaded: LoadedModel) -> None:
    # One running slot: the first request runs, the second waits, the third finds it full.
    config = EngineConfig(device="cpu", max_model_len=256, kv_cache_memory=32 << 20, max_num_seqs=1)
    engine = AsyncLLMEngine.from_config(config, smollm2_loaded, max_waiting=1)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def run() -> None:
        first = await engine.add_requests([GenerateRequest("a", "Hello", long)])
        await anext(first)  # running now
        second = await engine.add_requests([GenerateRequest("b", "Hello", long)])
        with pytest.raises(EngineOverloadedError, match="limit 1"):
            await engine.add_requests([GenerateRequest("c", "Hello", long)])
        first.close()
        second.close()

    try:
        asyncio.run(run())
        _wait_idle(engine)
    finally:
        engine.shutdown()


def test_a_batch_is_accepted_whole_or_not_at_all(engine: AsyncLLMEngine) -> None:
    async def add() -> None:
        ok = GenerateRequest("ok", "Hello", GREEDY)
        bad = GenerateRequest("bad", "word " * 300, GREEDY)
        await engine.add_requests([ok, bad])

    with pytest.raises(ValueError):
        asyncio.run(add())
    _wait_idle(engine)  # "ok" was added, then removed with the batch


def test_closing_a_stream_aborts_and_frees_blocks(engine: AsyncLLMEngine) -> None:
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def read_two() -> int:
        requests = [GenerateRequest(f"c{i}", f"Story number {i}:", long) for i in range(3)]
        async with await engine.add_requests(requests) as stream:
            seen = [await anext(stream) for _ in range(2)]
        return len(seen)

    assert asyncio.run(read_two()) == 2
    _wait_idle(engine)
    assert engine.stats().num_generation_tokens < 3 * 200


def test_cancelling_the_consumer_aborts(engine: AsyncLLMEngine) -> None:
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def consume() -> None:
        async for _ in engine.generate("cancel-me", "Once upon a time", long):
            pass

    async def main() -> None:
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    _wait_idle(engine)


def test_the_thread_sleeps_when_idle(engine: AsyncLLMEngine) -> None:
    _wait_idle(engine)
    steps = engine.stats().num_steps
    time.sleep(0.3)
    assert engine.stats().num_steps == steps


def test_shutdown_fails_pending_and_later_requests(smollm2_loaded: LoadedModel) -> None:
    engine = AsyncLLMEngine.from_config(_config(), smollm2_loaded)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> None:
        stream = await engine.add_requests([GenerateRequest("s", "Hello", long)])
        await anext(stream)
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_requests([GenerateRequest("t", "Hello", GREEDY)])

    asyncio.run(main())
    assert not engine.is_healthy
