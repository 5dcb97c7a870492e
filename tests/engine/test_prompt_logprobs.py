"""Prompt logprobs against transformers on the same weights: every prompt token's logprob,
rank and best alternatives, through chunked prefill, a prefix-cache hit and preemption, and
``max_tokens=0`` (the prompt alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from crossinfer import LLM, SamplingParams
from crossinfer.engine.outputs import RequestOutput
from crossinfer_conformance.checks.tiny_model import build_tiny_model

PROMPT = [5, 17, 99, 3, 42, 42, 8, 200, 150, 4, 77, 31, 6, 9, 123, 64, 11, 250, 12, 13]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), head_size=16, seed=5)


@pytest.fixture(scope="module")
def expected(folder: Path) -> torch.Tensor:
    """transformers' log-softmax at every prompt position. # [len(PROMPT), vocab]"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _llm(folder: Path, **engine_args: Any) -> LLM:
    return LLM(model=str(folder), device="cpu", max_model_len=128, **engine_args)


def assert_matches(output: RequestOutput, expected: torch.Tensor, num_top: int) -> None:
    scores = output.prompt_logprobs
    assert scores is not None and len(scores) == len(PROMPT)
    assert scores[0] is None
    for i, score in enumerate(scores[1:], start=1):
        assert score is not None and score.token_id == PROMPT[i]
        row = expected[i - 1]  # the position before token i predicts it
        assert score.logprob == pytest.approx(float(row[PROMPT[i]]), abs=1e-4)
        assert score.rank == int((row > row[PROMPT[i]]).sum()) + 1
        top = row.topk(num_top)
        assert [t for t, _ in score.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in score.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("budget", [2048, 8, 3])  # whole prompt, 3 chunks, 7 chunks
def test_prompt_logprobs_equal_transformers(
    folder: Path, expected: torch.Tensor, budget: int
) -> None:
    llm = _llm(folder, max_num_batched_tokens=budget, kv_cache_memory=4 << 20)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    (output,) = llm.generate([PROMPT], params)
    assert_matches(output, expected, 3)
    assert len(output.outputs[0].token_ids) == 2


def test_a_cached_prefix_is_scored_anyway(folder: Path, expected: torch.Tensor) -> None:
    llm = _llm(folder, kv_cache_memory=4 << 20)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1))  # fills the cache
    hits = llm.engine.scheduler.kv_cache.num_prefix_hit_tokens
    (output,) = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    )
    assert_matches(output, expected, 0)
    assert llm.engine.scheduler.kv_cache.num_prefix_hit_tokens == hits  # no hit was taken


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(
    folder: Path, expected: torch.Tensor
) -> None:
    llm = _llm(folder, kv_cache_memory=4 << 20)
    (output,) = llm.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert_matches(output, expected, 1)
    completion = output.outputs[0]
    assert completion.token_ids == () and completion.text == ""
    assert completion.finish_reason == "length"
    kv = llm.engine.scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_blocks


def test_preempted_requests_keep_their_scores(folder: Path, expected: torch.Tensor) -> None:
    # Six blocks of 16 tokens: four 20-token prompts that each grow by 20 tokens cannot all
    # stay, so some are preempted and recomputed.
    llm = _llm(folder, block_size=16, kv_cache_memory=6 * 2 * 2 * 16 * 16 * 4 * 1)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=2)
    outputs = llm.generate([PROMPT] * 4, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for output in outputs:
        assert_matches(output, expected, 2)


def test_requests_without_prompt_logprobs_get_none(folder: Path) -> None:
    (output,) = _llm(folder, kv_cache_memory=4 << 20).generate(
        [PROMPT], SamplingParams(max_tokens=1)
    )
    assert output.prompt_logprobs is None
