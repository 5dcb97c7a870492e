"""``crossinfer generate``: run prompts through the offline API and print the replies."""

from __future__ import annotations

import argparse


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--sample-seed", type=int, default=None, help="per-request seed")


def run(args: argparse.Namespace) -> int:
    from crossinfer.engine_args import engine_config_from_args
    from crossinfer.llm import LLM
    from crossinfer.sampling_params import SamplingParams

    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sample_seed,
    )
    llm = LLM(**vars(engine_config_from_args(args)))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for prompt, output in zip(args.prompt, outputs, strict=True):
        for completion in output.outputs:
            print(f"--- {prompt!r} [{completion.index}] ({completion.finish_reason})")
            print(completion.text)
    return 0
