"""The ``crossinfer`` command: a small dispatcher over subcommands.

Each subcommand has one ``_add_<name>(sub)`` function that builds its parser and sets
``run`` to a function taking the parsed arguments and returning the exit status. Commands
whose logic is more than a few lines keep it in their own module and import it inside their
``run`` function, so ``crossinfer backends`` does not pay for the engine or the server.

Commands that run a model take ``--device`` through :func:`add_device_argument` and call
:func:`crossinfer.registry.resolve_device` before loading anything; a
:class:`~crossinfer.registry.DeviceError` becomes a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from crossinfer.backends_table import format_json, format_table
from crossinfer.registry import AUTO_ORDER, DeviceError, discover

# What ArgumentParser.add_subparsers returns (argparse gives it no public name); each _add_*
# function registers one command on it.
Subparsers = argparse._SubParsersAction


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (default ``auto``) to a subcommand's parser."""
    parser.add_argument(
        "--device",
        default="auto",
        metavar="NAME",
        help=(
            "backend to run on: auto (the first available of "
            f"{', '.join(AUTO_ORDER)}, then other installed backends by priority) "
            "or a name listed by `crossinfer backends` (default: auto)"
        ),
    )


def _add_backends(sub: Subparsers[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "backends",
        help="list installed backends and whether each can run here",
        description="List every backend registered in the crossinfer.backends entry-point "
        "group, with its package, version, contract api, availability and devices.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    parser.set_defaults(run=_run_backends)


def _run_backends(args: argparse.Namespace) -> int:
    infos = discover()
    print(format_json(infos) if args.json else format_table(infos))
    return 0


def _add_generate(sub: Subparsers[argparse.ArgumentParser]) -> None:
    from crossinfer.commands.generate import add_sampling_arguments
    from crossinfer.engine_args import add_engine_arguments

    parser = sub.add_parser("generate", help="generate text for prompts, offline")
    add_device_argument(parser)
    add_engine_arguments(parser)
    add_sampling_arguments(parser)
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from crossinfer.commands.generate import run

    return run(args)


def _add_serve(sub: Subparsers[argparse.ArgumentParser]) -> None:
    from crossinfer.engine_args import add_engine_arguments
    from crossinfer.server.serve import add_serve_arguments

    parser = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI- and TGI-compatible HTTP API",
        description="Serve a model (default: the embedded SmolLM2-135M-Instruct) with "
        "/v1/completions, /v1/chat/completions, /v1/models, /generate, /generate_stream, "
        "/tokenize, /detokenize, /health and /metrics.",
    )
    add_device_argument(parser)
    add_engine_arguments(parser)
    add_serve_arguments(parser)
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from crossinfer.server.serve import run

    return run(args)


def _add_bench(sub: Subparsers[argparse.ArgumentParser]) -> None:
    from crossinfer.commands import bench_args
    from crossinfer.engine_args import add_engine_arguments

    parser = sub.add_parser("bench", help="benchmarks")
    kinds = parser.add_subparsers(dest="bench", metavar="KIND", required=True)
    throughput = kinds.add_parser(
        "throughput", help="offline throughput against transformers, in one run"
    )
    add_device_argument(throughput)
    add_engine_arguments(throughput)
    bench_args.add_throughput_arguments(throughput)
    throughput.set_defaults(run=_run_bench_throughput)
    serve = kinds.add_parser(
        "serve", help="a concurrency sweep of streaming completions against an HTTP server"
    )
    bench_args.add_serve_bench_arguments(serve)
    serve.set_defaults(run=_run_bench_serve)
    lora = kinds.add_parser(
        "lora", help="throughput with random LoRA adapters mixed, against the base model"
    )
    add_device_argument(lora)
    add_engine_arguments(lora)
    bench_args.add_lora_bench_arguments(lora)
    lora.set_defaults(run=_run_bench_lora)
    structured = kinds.add_parser(
        "structured", help="throughput with half the requests under a JSON schema, and none"
    )
    add_device_argument(structured)
    add_engine_arguments(structured)
    bench_args.add_structured_bench_arguments(structured)
    structured.set_defaults(run=_run_bench_structured)
    quality = kinds.add_parser(
        "quality", help="a quantisation's greedy agreement and logprob error against the model"
    )
    add_device_argument(quality)
    add_engine_arguments(quality)
    bench_args.add_quality_arguments(quality)
    quality.set_defaults(run=_run_bench_quality)


def _run_bench_throughput(args: argparse.Namespace) -> int:
    from crossinfer.commands.bench_throughput import run

    return run(args)


def _run_bench_lora(args: argparse.Namespace) -> int:
    from crossinfer.commands.bench_lora import run

    return run(args)


def _run_bench_structured(args: argparse.Namespace) -> int:
    from crossinfer.commands.bench_structured import run

    return run(args)


def _run_bench_quality(args: argparse.Namespace) -> int:
    from crossinfer.commands.bench_quality import run

    return run(args)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from crossinfer.commands.bench_serve import run

    return run(args)


def _add_conformance(sub: Subparsers[argparse.ArgumentParser]) -> None:
    from crossinfer_conformance import LEVELS

    parser = sub.add_parser(
        "conformance",
        help="check a backend against the CPU reference (the conformance suite)",
        description="Run the conformance suite on one backend and write a JSON report and a "
        "Markdown matrix, or (--matrix) render the matrix of every report in a folder.",
    )
    add_device_argument(parser)
    parser.add_argument(
        "--emulate",
        action="store_true",
        help="set CROSSINFER_EMULATE=1: a backend that can run its kernels on a stand-in "
        "without its hardware does so, and the report says 'emulated'",
    )
    parser.add_argument(
        "--level", choices=LEVELS, default=LEVELS[-1], help="run L0 up to this level (default L5)"
    )
    parser.add_argument(
        "--report", metavar="PATH", help="JSON report (default: conformance-NAME.json); .md beside"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("-k", metavar="EXPR", help="only cases matching this pytest -k expression")
    parser.add_argument(
        "--matrix", metavar="FOLDER", help="print the Markdown matrix of the reports in FOLDER"
    )
    parser.set_defaults(run=_run_conformance)


def _run_conformance(args: argparse.Namespace) -> int:
    from crossinfer_conformance import runner
    from crossinfer_conformance.report import render_matrix

    if args.matrix is not None:
        print(render_matrix(args.matrix), end="")
        return 0
    name = runner.resolve_backend_name(args.device, args.emulate)
    report = args.report or runner.default_report_path(name)
    return runner.run_conformance(name, args.emulate, args.level, report, args.seed, args.k)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="crossinfer", description="LLM inference on any accelerator."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_backends(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_bench(sub)
    _add_conformance(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: parse ``argv`` (default ``sys.argv[1:]``), run, exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = args.run(args)
    except (DeviceError, ValueError) as exc:
        print(f"crossinfer: error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
