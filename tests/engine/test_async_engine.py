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
from tests.engine.client_checks import check_closing_aborts, check_refusals, wait_idle

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _config() -> EngineConfig:
    return EngineConfig(device="cpu", max_model_len=256, kv_cache_memory=32 << 20)


@pytest.fixture(scope="module")
def engine(smollm2_loaded: LoadedModel) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine.from_config(_config(), smollm2_loaded)
    yield engine
    engine.shutdown()


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
    wait_idle(engine)


def test_refusals_raise_and_leave_nothing_behind(engine: AsyncLLMEngine) -> None:
    check_refusals(engine)


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
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_a_batch_is_accepted_whole_or_not_at_all(engine: AsyncLLMEngine) -> None:
    async def add() -> None:
        ok = GenerateRequest("ok", "Hello", GREEDY)
        bad = GenerateRequest("bad", "word " * 300, GREEDY)
        await engine.add_requests([ok, bad])

    with pytest.raises(ValueError):
        asyncio.run(add())
    wait_idle(engine)  # "ok" was added, then removed with the batch


def test_closing_a_stream_aborts_and_frees_blocks(engine: AsyncLLMEngine) -> None:
    check_closing_aborts(engine)


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
    wait_idle(engine)


def test_the_thread_sleeps_when_idle(engine: AsyncLLMEngine) -> None:
    wait_idle(engine)
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
