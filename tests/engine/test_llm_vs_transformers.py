"""Greedy tokens of the whole engine equal transformers' generate for SmolLM2, whatever the
engine's prefix caching, chunking or preemption does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from crossinfer import LLM, SamplingParams
from crossinfer.engine.scheduler import SchedulerOutput
from crossinfer.engine.setup import LoadedModel

pytestmark = pytest.mark.slow

SHARED = (
    "You are a careful assistant. Answer in one short paragraph, plainly, without lists, "
    "and say when you are unsure. The user asks: "
)
PROMPTS = [
    SHARED + "Why is the sky blue?",
    SHARED + "How do bees make honey?",
    SHARED + "What is a prime number?",
    SHARED + "Name three rivers in Europe and say where they flow.",
    "Hello",
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "In 1905 Albert Einstein published four papers that",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def loaded(smollm2_loaded: LoadedModel) -> LoadedModel:
    return smollm2_loaded


@pytest.fixture(scope="module")
def expected(loaded: LoadedModel) -> list[list[int]]:
    # transformers' own Llama with the weights our loader reads from the GGUF (the loader's
    # tests show they equal what transformers' GGUF reader produces, tensor for tensor).
    files = loaded.model_files
    model = AutoModelForCausalLM.from_config(files.config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(dict(files.iter_weights()), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    tokens = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(
                ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=loaded.tokenizer.eos_token_id,
            )
            tokens.append(out[0, ids.shape[1] :].tolist())
    return tokens


def _run(loaded: LoadedModel, **engine_args: object) -> tuple[list[list[int]], LLM]:
    llm = LLM(device="cpu", loaded=loaded, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    return [list(o.outputs[0].token_ids) for o in outputs], llm


def test_prefix_caching_off(loaded: LoadedModel, expected: list[list[int]]) -> None:
    tokens, llm = _run(loaded, enable_prefix_caching=False, kv_cache_memory=64 << 20)
    assert tokens == expected
    assert llm.engine.scheduler.kv_cache.num_prefix_hit_tokens == 0


def test_prefix_caching_on_hits_shared_prefix(
    loaded: LoadedModel, expected: list[list[int]]
) -> None:
    # One step admits everything: the shared blocks are hashed by the first request's
    # allocation and hit by the next three in the same step.
    tokens, llm = _run(loaded, enable_prefix_caching=True, kv_cache_memory=64 << 20)
    assert tokens == expected
    kv = llm.engine.scheduler.kv_cache
    assert kv.num_prefix_hit_tokens >= 3 * 16
    assert kv.num_free_blocks == kv.num_blocks


def test_chunked_prefill(loaded: LoadedModel, expected: list[list[int]]) -> None:
    llm = LLM(device="cpu", loaded=loaded, max_num_batched_tokens=24, kv_cache_memory=64 << 20)
    steps: list[SchedulerOutput] = []
    execute = llm.engine.runner.execute

    def recording_execute(output: SchedulerOutput) -> list:
        steps.append(output)
        return execute(output)

    llm.engine.runner.execute = recording_execute  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    assert tokens == expected
    assert max(step.num_tokens for step in steps) <= 24
    partial = [c for step in steps for c in step.chunks if not c.samples]
    assert len(partial) >= 4  # long prompts were split over several steps


def test_preemption(loaded: LoadedModel, expected: list[list[int]]) -> None:
    spec_bytes = 2 * 30 * 3 * 64 * 4 * 16  # bytes of one 16-token block of SmolLM2 in fp32
    tokens, llm = _run(loaded, kv_cache_memory=22 * spec_bytes)
    assert llm.engine.parts.num_blocks == 22
    assert llm.engine.scheduler.num_preemptions > 0
    assert tokens == expected
