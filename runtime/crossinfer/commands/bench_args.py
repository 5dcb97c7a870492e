"""Flags of the bench commands, kept apart so building the CLI parser imports no engine."""

from __future__ import annotations

import argparse
import sys


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--single-prompts", type=int, default=4, help="prompts for the one-at-a-time baseline"
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the transformers baselines"
    )
    parser.add_argument(
        "--baseline",
        choices=("vllm",),
        default=None,
        help="also run vLLM's offline engine on the same prompts (in --baseline-python)",
    )
    parser.add_argument(
        "--baseline-python",
        default=sys.executable,
        help="the interpreter vLLM is installed in (default: this one)",
    )
    parser.add_argument(
        "--rounds", type=_positive, default=1, help="timed runs of each engine, interleaved"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write JSON here")


def add_lora_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=_positive, default=32)
    parser.add_argument("--input-len", type=_positive, default=128)
    parser.add_argument("--output-len", type=_positive, default=64)
    parser.add_argument(
        "--lora-adapters", type=_positive, default=4, help="random adapters mixed (default 4)"
    )
    parser.add_argument("--lora-rank", type=_positive, default=16, help="their rank (default 16)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write JSON here")


def add_structured_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=_positive, default=32)
    parser.add_argument("--input-len", type=_positive, default=128)
    parser.add_argument("--output-len", type=_positive, default=64)
    parser.add_argument(
        "--structured-share",
        type=float,
        default=0.5,
        help="the share of requests under a JSON schema (default 0.5)",
    )
    parser.add_argument(
        "--rounds", type=_positive, default=3, help="timed runs of each, interleaved"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write JSON here")


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=_positive, default=50, help="at most 50")
    parser.add_argument("--output-len", type=_positive, default=64)
    parser.add_argument("--json", dest="json_path", default=None, help="also write JSON here")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--model", default=None, help="model name (default: the first listed)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--concurrency",
        default="1,4,16,32",
        help="comma-separated numbers of requests in flight (default 1,4,16,32)",
    )
    parser.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="requests per concurrency level (default: 2 x the level, at least 4)",
    )
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated (EOS off)")
    parser.add_argument(
        "--prompt-kind",
        choices=("ids", "text"),
        default="ids",
        help="random token ids (exact length; the default) or random words (about one token "
        "each), for servers that take only text",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument(
        "--output-dir",
        default=".",
        help="where bench_serve.json, bench_serve.md and bench_serve.png go (default: .)",
    )
