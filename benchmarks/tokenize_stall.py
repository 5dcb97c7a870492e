"""Do running streams stall while a huge prompt arrives? Against any OpenAI-compatible server.

Opens ``--streams`` streaming completions, lets them run for a quiet baseline, then sends a
prompt of ``--prompt-mib`` MiB of text ``--repeats`` times (one after another) while they run.
Prints the gaps between consecutive tokens of the streams, for the quiet baseline and for the
windows in which a huge prompt was being handled, measured in the same run. The huge prompt is
longer than any context, so the server tokenises it and refuses it: what is measured is what
tokenising it costs everyone else.

    python benchmarks/tokenize_stall.py --url http://127.0.0.1:8000
(serve with --max-body-bytes 4MiB or more, so the prompt is read rather than refused at once)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import httpx

WORDS = "the of and to in is was for on that with as by at from his her it an be".split()


def _stats(gaps: list[float]) -> str:
    if not gaps:
        return "no gaps"
    ordered = sorted(gaps)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (
        f"{len(gaps)} gaps: median {statistics.median(gaps) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"max {ordered[-1] * 1e3:.1f} ms"
    )


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    huge = " ".join(rng.choice(WORDS) for _ in range(args.prompt_mib * (1 << 20) // 3))
    huge = huge[: args.prompt_mib << 20]
    arrivals: list[list[float]] = [[] for _ in range(args.streams)]
    windows: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    timeout = httpx.Timeout(600.0)

    async with httpx.AsyncClient(base_url=args.url, timeout=timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def stream(i: int) -> None:
            body = {
                "model": model,
                "prompt": f"Story {i}: once upon a time",
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        arrivals[i].append(time.monotonic())
                    if stop.is_set():
                        return

        tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
        await asyncio.sleep(args.baseline_s)
        for _ in range(args.repeats):
            start = time.monotonic()
            r = await client.post("/v1/completions", json={"model": model, "prompt": huge})
            windows.append((start, time.monotonic(), r.status_code))
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    first_window = windows[0][0]
    quiet: list[float] = []
    during: list[float] = []
    for times in arrivals:
        for a, b in zip(times, times[1:], strict=False):
            if b < first_window:
                quiet.append(b - a)
            elif any(a < end and b > start for start, end, _ in windows):
                during.append(b - a)
    print(f"{args.streams} streams; a {args.prompt_mib} MiB prompt sent {args.repeats} times")
    for start, end, status in windows:
        print(f"  huge prompt: HTTP {status} after {(end - start) * 1e3:.0f} ms")
    print(f"quiet baseline:          {_stats(quiet)}")
    print(f"while a prompt arrives:  {_stats(during)}")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-mib", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--baseline-s", type=float, default=3.0)
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
