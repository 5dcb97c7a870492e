"""A bounded fault soak: a few hundred requests at concurrency 16 with random valid
parameters over all four generation routes, 30% streaming, 10% of the streams dropped
mid-way, 5% malformed bodies. Afterwards nothing runs, every KV block is free (read from
/metrics), the server is healthy and its memory grew by less than a stated bound."""

from __future__ import annotations

import asyncio
import json
import random
import resource
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import MODEL
from tests.server.harness import serve_in_thread

pytestmark = pytest.mark.slow

NUM_REQUESTS = 320
CONCURRENCY = 16
RSS_GROWTH_BOUND = 64 << 20  # bytes, after a warm-up; measured growth is printed
WORDS = "the a cat dog runs over bridge river city light dark seven blue quick lazy".split()
STOPS = ["\n", ".", " the", "ing", "!!"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _text(rng: random.Random, lo: int = 1, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _sampling(rng: random.Random, logprobs_field: str | None) -> dict[str, Any]:
    """A random valid subset of the OpenAI sampling fields."""
    max_tokens = rng.randint(1, 12)
    candidates: dict[str, Any] = {
        "temperature": rng.choice([0, 0, 0.3, 0.8, 1.2]),
        "top_p": rng.choice([1.0, 0.9, 0.5]),
        "top_k": rng.choice([-1, 0, 1, 5, 40]),
        "min_p": rng.choice([0.0, 0.05]),
        "presence_penalty": rng.uniform(-1, 1),
        "frequency_penalty": rng.uniform(-1, 1),
        "repetition_penalty": rng.choice([1.0, 1.1, 0.9]),
        "seed": rng.choice([None, rng.randint(-(2**63), 2**64 - 1)]),
        "n": rng.randint(1, 3),
        "stop": rng.sample(STOPS, rng.randint(0, 2)),
        "stop_token_ids": rng.sample(range(49152), rng.randint(0, 2)),
        "logit_bias": {str(rng.randrange(49152)): rng.uniform(-100, 100)},
        "min_tokens": rng.randint(0, max_tokens),
        "ignore_eos": rng.random() < 0.5,
        "prompt_logprobs": rng.choice([None, 0, 2]),
        "cache_salt": rng.choice(["t1", "t2"]),
    }
    if logprobs_field:
        candidates[logprobs_field] = rng.choice([0, 1, 3])
    chosen = {k: v for k, v in candidates.items() if rng.random() < 0.4}
    chosen["max_tokens"] = max_tokens
    if chosen.get("min_tokens", 0) > max_tokens:
        chosen["min_tokens"] = max_tokens
    return {k: v for k, v in chosen.items() if v is not None}


def plan(rng: random.Random) -> dict[str, Any]:
    """One request: route, body (or malformed bytes), whether it streams or is dropped."""
    route = rng.choice(["/v1/completions", "/v1/chat/completions", "/generate", "tgi-stream"])
    stream = rng.random() < 0.3
    drop = stream and rng.random() < 0.1 / 0.3  # 10% of all requests are dropped streams
    if rng.random() < 0.05:
        garbage = rng.choice(
            [b"{", b"not json", b'{"prompt": }', b"[]", b'{"prompt": "x", "max_tokens": "many"}']
        )
        return {"route": rng.choice(["/v1/completions", "/generate"]), "raw": garbage}
    if route == "/v1/completions":
        body: dict[str, Any] = _sampling(rng, "logprobs")
        prompts = [_text(rng) for _ in range(rng.randint(1, 3))]
        body["prompt"] = prompts[0] if len(prompts) == 1 else prompts
        body["echo"] = rng.random() < 0.2
    elif route == "/v1/chat/completions":
        body = _sampling(rng, None)
        if rng.random() < 0.3:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 3)
        body["messages"] = [{"role": "user", "content": _text(rng)}]
    else:
        parameters: dict[str, Any] = {"max_new_tokens": rng.randint(1, 12)}
        if rng.random() < 0.5:
            parameters |= {"do_sample": True, "temperature": 0.7, "seed": rng.randint(0, 2**64 - 1)}
        if rng.random() < 0.3:
            parameters |= {"details": True, "top_n_tokens": 2, "decoder_input_details": True}
        body = {"inputs": _text(rng), "parameters": parameters}
        stream = stream or route == "tgi-stream"
        route = "/generate_stream" if stream else "/generate"
    if route.startswith("/v1"):
        body["model"] = MODEL
        body["stream"] = stream
    return {"route": route, "body": body, "stream": stream, "drop": drop}


async def send(client: httpx.AsyncClient, request: dict[str, Any]) -> str:
    """Send one planned request; the outcome's name (checked by the caller)."""
    route = request["route"]
    if "raw" in request:
        r = await client.post(
            route, content=request["raw"], headers={"content-type": "application/json"}
        )
        assert r.status_code in (400, 422), (request, r.text)
        return "malformed"
    if not request["stream"]:
        r = await client.post(route, json=request["body"])
        assert r.status_code == 200, (request, r.text)
        return "whole"
    async with client.stream("POST", route, json=request["body"]) as r:
        assert r.status_code == 200, request
        events = []
        async for line in r.aiter_lines():
            if not line:
                continue
            events.append(line)
            if request["drop"] and len(events) == 2:
                return "dropped"  # leaving the block closes the connection mid-stream
    assert all(e.startswith("data: ") for e in events), events
    assert not any('"error"' in e for e in events), events
    if route.startswith("/v1"):
        assert events[-1] == "data: [DONE]"
    else:
        assert json.loads(events[-1][6:])["details"] is not None
    return "streamed"


def metrics(client: httpx.Client) -> dict[str, float]:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("crossinfer_") and "{" in line:
            name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
            values[name] = float(value)
    return values


@pytest.fixture(scope="module")
def url(server_engine: Any) -> Iterator[str]:
    from crossinfer.server.app import build_app
    from crossinfer.server.context import ServerSettings

    with serve_in_thread(build_app(server_engine, ServerSettings(served_model_name=MODEL))) as u:
        yield u


def test_fault_soak(url: str) -> None:
    rng = random.Random(20261201)
    requests = [plan(rng) for _ in range(NUM_REQUESTS)]
    outcomes: Counter[str] = Counter()

    async def run(batch: list[dict[str, Any]]) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def one(request: dict[str, Any]) -> None:
                async with limit:
                    outcomes[await send(client, request)] += 1

            await asyncio.gather(*(one(r) for r in batch))

    asyncio.run(run(requests[:32]))  # warm-up: caches, allocator pools, compiled kernels
    rss_before = _rss_bytes()
    start = time.monotonic()
    asyncio.run(run(requests[32:]))
    elapsed = time.monotonic() - start
    with httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + 30
        while True:  # dropped streams are aborted by the engine thread shortly after
            m = metrics(client)
            idle = m["crossinfer_num_requests_running"] == m["crossinfer_num_requests_waiting"] == 0
            if idle and m["crossinfer_kv_cache_usage_ratio"] == 0:
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.1)
        assert client.get("/health").json() == {"status": "ok"}
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
    growth = _rss_bytes() - rss_before
    print(f"soak: {NUM_REQUESTS - 32} requests in {elapsed:.1f} s, {dict(outcomes)}, "
          f"RSS growth {growth / 2**20:.1f} MiB")  # fmt: skip
    assert sum(outcomes.values()) == NUM_REQUESTS
    assert outcomes["dropped"] > 0 and outcomes["malformed"] > 0 and outcomes["streamed"] > 0
    assert growth < RSS_GROWTH_BOUND
