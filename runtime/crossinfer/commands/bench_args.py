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
