"""``crossinfer bench quality``: what a quantisation (``--quantization``) or a narrower KV cache
(``--kv-cache-dtype``) costs in accuracy, against the plain model on the same prompts and
weights.

Two measures over chat prompts of ordinary text (``PROMPTS``), greedy:

- agreement: how many tokens the quantised model generates before it first differs from the
  reference (``output_len`` when it never does); median and worst over the prompts;
- logprob error: the reference's greedy tokens scored by the quantised model (as prompt
  logprobs of prompt + reference continuation), against the reference's own logprobs of them;
  mean and max of the absolute difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crossinfer.llm import LLM

_TOPICS = (
    "the water cycle", "photosynthesis", "the French Revolution", "black holes", "volcanoes",
    "the immune system", "compound interest", "the printing press", "plate tectonics",
    "machine learning", "the Roman Empire", "electric cars", "honey bees", "the moon landing",
    "climate change", "the human heart", "chess openings", "coffee brewing", "the internet",
    "vaccines", "earthquakes", "the Great Wall of China", "recycling", "solar panels",
    "the stock market",
)  # fmt: skip
_ASKS = ("Explain {} to a ten-year-old.", "Write three short facts about {}.")
PROMPTS: tuple[str, ...] = tuple(ask.format(topic) for topic in _TOPICS for ask in _ASKS)
"""50 prompts: two asks about each of 25 topics."""


@dataclass(frozen=True)
class Quality:
    method: str
    num_prompts: int
    output_len: int
    agree_median: float
    agree_min: int
    identical: int
    """Prompts whose whole continuation equals the reference's."""
    logprob_err_mean: float
    logprob_err_max: float


def measure(
    reference: LLM, quantized: LLM, method: str, prompts: list[str], output_len: int
) -> Quality:
    """Compare ``quantized`` with ``reference`` on chat ``prompts``; returns a Quality."""
    from crossinfer.sampling_params import SamplingParams

    ids = [reference.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, logprobs=0)
    ref = [o.outputs[0] for o in reference.generate(ids, greedy)]
    got = [o.outputs[0] for o in quantized.generate(ids, greedy)]
    agree = [_common_prefix(r.token_ids, g.token_ids) for r, g in zip(ref, got, strict=True)]
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    scored = quantized.generate(
        [p + list(r.token_ids) for p, r in zip(ids, ref, strict=True)], score
    )
    errors: list[float] = []
    for prompt, r, s in zip(ids, ref, scored, strict=True):
        theirs = s.prompt_logprobs or ()
        for k, token in enumerate(r.logprobs or ()):
            other = theirs[len(prompt) + k]
            assert other is not None and other.token_id == token.token_id
            assert token.logprob is not None and other.logprob is not None
            errors.append(abs(token.logprob - other.logprob))
    return Quality(
        method=method,
        num_prompts=len(prompts),
        output_len=output_len,
        agree_median=statistics.median(agree),
        agree_min=min(agree),
        identical=sum(a == output_len for a in agree),
        logprob_err_mean=statistics.fmean(errors),
        logprob_err_max=max(errors),
    )


def _common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from crossinfer.engine_args import engine_config_from_args
    from crossinfer.llm import LLM

    config = engine_config_from_args(args)
    changes = [config.quantization] if config.quantization else []
    if config.kv_cache_dtype != "auto":
        changes.append(f"KV cache {config.kv_cache_dtype}")
    if not changes:
        raise SystemExit(
            "bench quality compares a quantisation (--quantization) or a KV-cache dtype "
            "(--kv-cache-dtype) with the plain model: pass one"
        )
    reference = LLM(**asdict(replace(config, quantization=None, kv_cache_dtype="auto")))
    candidate = LLM(**asdict(config))
    prompts = list(PROMPTS[: args.num_prompts])
    quality = measure(reference, candidate, " + ".join(changes), prompts, args.output_len)
    dtype = str(reference.engine.parts.loaded.dtype).removeprefix("torch.")
    print(
        f"{quality.method} against {dtype} on {quality.num_prompts} "
        f"prompts, {quality.output_len} greedy tokens each\n"
        f"tokens before the first difference: median {quality.agree_median:g}, worst "
        f"{quality.agree_min}; identical continuations {quality.identical}/{quality.num_prompts}\n"
        f"|logprob difference| of the reference's tokens: mean {quality.logprob_err_mean:.4f}, "
        f"max {quality.logprob_err_max:.4f}"
    )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(asdict(quality), f, indent=2)
    return 0
