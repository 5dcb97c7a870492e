"""Checks every engine client must pass (the in-process ``AsyncLLMEngine`` and the
``ProcessEngine``), on the embedded model with ``max_model_len`` 256."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from crossinfer import SamplingParams
from crossinfer.engine.frontend import EngineClient, GenerateRequest


def wait_idle(engine: EngineClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_blocks:
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine did not become idle: {engine.stats()}")


def check_refusals(engine: EngineClient) -> None:
    """Prompts that can never run are refused with the reason and leave nothing behind."""

    async def add(prompt: Any) -> None:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        await engine.add_requests([GenerateRequest("r", prompt, params)])

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
    wait_idle(engine)


def check_closing_aborts(engine: EngineClient) -> None:
    """Closing a stream after two outputs aborts its three requests and frees their blocks."""
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def read_two() -> None:
        requests = [GenerateRequest(f"c{i}", f"Story number {i}:", long) for i in range(3)]
        async with await engine.add_requests(requests) as stream:
            for _ in range(2):
                await anext(stream)

    before = engine.stats().num_generation_tokens
    asyncio.run(read_two())
    wait_idle(engine)
    assert engine.stats().num_generation_tokens - before < 3 * 200
