"""Flags of the bench commands, kept apart so building the CLI parser imports no engine."""

from __future__ import annotations

import argparse


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--single-prompts", type=int, default=4, help="prompts for the one-at-a-time baseline"
    )
    parser.add_argument("--no-baselines", action="store_true", help="measure crossinfer only")
    parser.add_argument("--json", dest="json_path", default=None, help="also write JSON here")


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
