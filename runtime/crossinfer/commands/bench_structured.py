"""``crossinfer bench structured``: offline throughput with a share of the requests under a
JSON schema, against the same requests with none.

Workload as ``bench throughput``'s: ``num_prompts`` prompts of ``input_len`` random token ids,
greedy, EOS ignored. Every other request (``--structured-share``, default 0.5) is constrained
to a JSON list of ``output_len`` one-digit integers: a grammar that cannot complete before
``output_len`` tokens, so both runs generate exactly the same number of tokens and the
difference is the grammar's cost alone (the compilation, cached by schema after the first
request, and a mask per constrained row per step). Rounds alternate the two runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from crossinfer.commands.bench_throughput import Figure, random_prompts


def _schema(output_len: int) -> dict[str, object]:
    digit = {"type": "integer", "minimum": 0, "maximum": 9}
    return {"type": "array", "items": digit, "minItems": output_len, "maxItems": output_len}


def run(args: argparse.Namespace) -> int:
    from crossinfer.engine.setup import load_model
    from crossinfer.engine_args import engine_config_from_args
    from crossinfer.llm import LLM
    from crossinfer.sampling_params import SamplingParams
    from crossinfer.structured_outputs import StructuredOutputsParams

    config = engine_config_from_args(args)
    loaded = load_model(config)
    llm = LLM(loaded=loaded, **asdict(config))
    plain = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    spec = StructuredOutputsParams(json=_schema(args.output_len))
    constrained = SamplingParams(
        temperature=0.0, max_tokens=args.output_len, ignore_eos=True, structured_outputs=spec
    )
    every = max(1, round(1 / args.structured_share)) if args.structured_share > 0 else 0
    mixed = [constrained if every and i % every == 0 else plain for i in range(args.num_prompts)]
    llm.generate(random_prompts(loaded, 2, args.input_len, args.seed), [plain, constrained])
    runs: dict[str, list[Figure]] = {"no schema": [], "with schema": []}
    for round_ in range(args.rounds):
        for name, params in (("no schema", [plain] * args.num_prompts), ("with schema", mixed)):
            # fresh prompts each run: no run reads another's prefix cache
            seed = args.seed + 1 + 2 * round_ + (name == "with schema")
            prompts = random_prompts(loaded, args.num_prompts, args.input_len, seed)
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
            produced = sum(len(o.outputs[0].token_ids) for o in outputs)
            runs[name].append(Figure(name, len(prompts), produced, seconds))
    share = sum(p is constrained for p in mixed) / len(mixed)
    print(f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, greedy")
    medians = {}
    for name, figures in runs.items():
        medians[name] = statistics.median(f.tokens_per_s for f in figures)
        label = name if name == "no schema" else f"{name} ({share:.0%} of requests)"
        rates = " / ".join(f"{f.tokens_per_s:.1f}" for f in figures)
        print(f"{label:32s} {medians[name]:8.1f} tokens/s (median of {rates})")
    print(f"ratio {medians['with schema'] / medians['no schema']:.3f}")
    if args.json_path:
        payload = {n: [asdict(f) for f in fs] for n, fs in runs.items()}
        Path(args.json_path).write_text(json.dumps(payload | {"share": share}, indent=2))
    return 0
