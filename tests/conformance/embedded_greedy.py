"""Greedy tokens of the embedded model (SmolLM2-135M GGUF) on one device, with prefix-cache
hits and a preemption: ``python embedded_greedy.py MODEL DEVICE`` prints them as JSON. Run by
test_emulated_xla_suites.py in both environments, so the compat one (torch 2.8 + torch-xla)
runs the emulated XLA backend and the main one the CPU reference."""

from __future__ import annotations

import json
import sys

from crossinfer import LLM, SamplingParams

MAX_TOKENS = 24
SHARED = "The quick brown fox jumps over the lazy dog. " * 4
PROMPTS = [SHARED + "Once upon a time", SHARED + "In a galaxy far away", "Hello, my name is"]
# 8 blocks of 16 tokens (30 layers x K and V x 16 x 3 kv heads x 64 x 4 bytes = 720 KiB
# each) for two running sequences of about 70 tokens (5 blocks each): one is preempted.
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4
LIMITS = {"max_model_len": 256, "max_num_batched_tokens": 128, "max_num_seqs": 2,
          "block_size": 16, "kv_cache_memory": 8 * BLOCK_BYTES}  # fmt: skip


def main(model: str, device: str) -> None:
    llm = LLM(model=model, device=device, dtype="float32", fail_on_recompile=True, **LIMITS)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    scheduler = llm.engine.scheduler
    print(json.dumps({
        "tokens": [o.outputs[0].token_ids for o in outputs],
        "preemptions": scheduler.num_preemptions,
        "prefix_hit_tokens": scheduler.kv_cache.num_prefix_hit_tokens,
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
