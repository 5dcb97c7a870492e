"""``crossinfer bench serve --url URL``: a concurrency sweep of streaming completions against
any OpenAI-compatible server (ours, vLLM, ...), over plain HTTP with httpx.

Each level keeps ``concurrency`` requests in flight until ``num_requests`` have finished.
Every request streams ``output_len`` tokens (``ignore_eos``, greedy) after a prompt of
``input_len`` random token ids (or random words). Per request: time to first token (TTFT,
from sending to the first text), time per output token (TPOT, the rest of the latency over
the other tokens) and the inter-token latencies (ITL, gaps between text chunks). Per level:
output tokens/s and requests/s over the level's wall time, and p50 / p90 / p99 of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from crossinfer.commands.png_plot import BLUE, ORANGE, Panel, save_panels

# Common short English words: about one token each in most vocabularies.
_WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my"
).split()


@dataclass
class RequestResult:
    """One streamed request, timed with ``time.perf_counter``."""

    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def run(args: argparse.Namespace) -> int:
    """Run the sweep; print the table; write JSON, Markdown and PNG to ``--output-dir``."""
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    report = asyncio.run(_sweep(args, levels))
    table = markdown_table(report["levels"])
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    base = os.path.join(args.output_dir, "bench_serve")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    plot(report["levels"], base + ".png")
    print(f"wrote {base}.json, {base}.md and {base}.png")
    failed = sum(level["failed"] for level in report["levels"])
    return 1 if failed else 0


async def _sweep(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels))
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    url = args.url.rstrip("/")
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or await _first_model(client, url)
        rng = np.random.default_rng(args.seed)
        warm = await _request(client, url, _payload(args, model, _prompt(args, rng), 4))
        if not warm.ok:
            raise SystemExit(f"crossinfer: error: the warm-up request failed: {warm.error}")
        results = []
        for concurrency in levels:
            num = args.num_requests or max(2 * concurrency, 4)
            prompts = [_prompt(args, rng) for _ in range(num)]
            payloads = [_payload(args, model, p, args.output_len) for p in prompts]
            results.append(await _level(client, url, concurrency, payloads))
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "api_key")}
    return {"url": url, "model": model, "settings": settings, "levels": results}


async def _first_model(client: httpx.AsyncClient, url: str) -> str:
    response = await client.get(url + "/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def _prompt(args: argparse.Namespace, rng: np.random.Generator) -> str | list[int]:
    if args.prompt_kind == "text":
        return " ".join(rng.choice(_WORDS, size=args.input_len).tolist())
    # Ids far from the special tokens at either end of common vocabularies.
    return rng.integers(1000, 10000, size=args.input_len).tolist()


def _payload(
    args: argparse.Namespace, model: str, prompt: str | list[int], max_tokens: int
) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> RequestResult:
    result = RequestResult(ok=False)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in response.aiter_lines():
                data = line.removeprefix("data:").strip()
                if not line.startswith("data:") or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices") or ()):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks  # a server without usage
    result.ok = chunks > 0
    return result


async def _level(
    client: httpx.AsyncClient, url: str, concurrency: int, payloads: list[dict[str, Any]]
) -> dict[str, Any]:
    queue = list(reversed(payloads))
    results: list[RequestResult] = []

    async def worker() -> None:
        while queue:
            results.append(await _request(client, url, queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(payloads)))))
    return summarise(concurrency, results, time.perf_counter() - start)


def _percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    p50, p90, p99 = np.percentile(np.asarray(values) * scale, [50, 90, 99]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99}


def summarise(concurrency: int, results: list[RequestResult], seconds: float) -> dict[str, Any]:
    """One level's figures; latencies in milliseconds."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": seconds,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])) if ok else 0.0,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / seconds,
        "requests_per_s": len(ok) / seconds,
        "ttft_ms": _percentiles([r.ttft for r in ok]),
        "tpot_ms": _percentiles(tpots),
        "itl_ms": _percentiles([gap for r in ok for gap in r.itls]),
    }


def markdown_table(levels: list[dict[str, Any]]) -> str:
    """One row per concurrency level."""
    head = (
        "| concurrency | requests | failed | output tok/s | req/s | TTFT p50 / p90 / p99 (ms) "
        "| TPOT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) |"
    )
    lines = [head, "|" + "---|" * 8]
    for s in levels:
        lines.append(
            f"| {s['concurrency']} | {s['num_requests']} | {s['failed']} "
            f"| {s['output_tokens_per_s']:.1f} | {s['requests_per_s']:.2f} "
            f"| {_trio(s['ttft_ms'])} | {_trio(s['tpot_ms'])} | {_trio(s['itl_ms'])} |"
        )
    return "\n".join(lines)


def _trio(percentiles: dict[str, float]) -> str:
    return " / ".join(f"{percentiles[p]:.0f}" for p in ("p50", "p90", "p99"))


def plot(levels: list[dict[str, Any]], path: str) -> None:
    """Output tokens/s and TTFT p50 against concurrency, side by side."""
    labels = [str(s["concurrency"]) for s in levels]
    panels = [
        Panel("output tokens/s", labels, [s["output_tokens_per_s"] for s in levels], BLUE),
        Panel("TTFT p50 (ms)", labels, [s["ttft_ms"]["p50"] for s in levels], ORANGE),
    ]
    save_panels(path, panels, "concurrency")
