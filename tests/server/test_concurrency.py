"""Continuous batching over HTTP, and client disconnects freeing the engine."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import openai
import pytest

from crossinfer import SamplingParams
from tests.server.conftest import MODEL

pytestmark = pytest.mark.slow


def _wait_until_idle(engine: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_blocks:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {timeout} s: {s}")
        time.sleep(0.05)


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_32_concurrent_streams_equal_the_offline_api(
    base_url: str, offline: Any, server_engine: Any
) -> None:
    prompts = [f"Fact {i}: the number {i * 7} is" for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main() -> list[tuple[str, str | None]]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    steps = server_engine.stats().num_steps
    results = asyncio.run(main())
    assert all(reason in ("stop", "length") for _, reason in results)
    assert [text for text, _ in results] == expected
    # Batched: far fewer steps than 32 requests x 8 tokens one at a time.
    assert server_engine.stats().num_steps - steps < 32 * 8 // 2
    _wait_until_idle(server_engine)


def test_disconnected_streams_are_aborted(base_url: str, server_engine: Any) -> None:
    before = server_engine.stats().num_generation_tokens

    async def open_and_drop(client: httpx.AsyncClient, i: int) -> int:
        body = {
            "model": MODEL,
            "prompt": f"Story {i}: once upon a time",
            "max_tokens": 300,
            "ignore_eos": True,
            "stream": True,
        }
        events = 0
        async with client.stream("POST", base_url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break  # leaving the block closes the connection mid-stream
        return events

    async def main() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(open_and_drop(client, i) for i in range(8)))

    assert asyncio.run(main()) == [3] * 8
    stats = _wait_until_idle(server_engine)
    assert stats.num_generation_tokens - before < 8 * 300 // 2
    text = httpx.get(base_url + "/metrics").text
    assert _metric(text, "crossinfer_num_requests_running") == 0
    assert _metric(text, "crossinfer_num_requests_waiting") == 0
    assert _metric(text, "crossinfer_kv_cache_usage_ratio") == 0


def test_a_disconnected_non_streaming_request_is_aborted(base_url: str, server_engine: Any) -> None:
    body = {"model": MODEL, "prompt": "A long essay:", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/completions", json=body, timeout=1.5)
    _wait_until_idle(server_engine)
