"""lm-evaluation-harness against the server, as its users run it: the ``local-completions``
model over /v1/completions, with two small local tasks (JSONL files in the tests, no hub
dataset). Its per-item log-likelihoods (echo + logprobs) equal transformers' on the same
weights within 1e-4, and its generate_until answers equal transformers' greedy ones."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server.conftest import MODEL

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "lm_eval_data"
MAX_GEN_TOKS = 12
UNTIL = ["\n", "."]
TASKS = f"""
task: crossinfer_multiple_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "multiple_choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
---
task: crossinfer_generate_until
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "generate_until.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: {MAX_GEN_TOKS}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def hf_model(smollm2_loaded: Any) -> Any:
    """transformers' Llama with the weights our loader reads from the GGUF."""
    files = smollm2_loaded.model_files
    model = AutoModelForCausalLM.from_config(files.config, dtype=torch.float32).eval()
    model.load_state_dict(dict(files.iter_weights()), strict=False)
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def results(
    base_url: str, smollm2_loaded: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("lm_eval")
    tokenizer_dir = folder / "tokenizer"
    smollm2_loaded.tokenizer.save_pretrained(tokenizer_dir)
    tasks_dir = folder / "tasks"
    tasks_dir.mkdir()
    for i, task in enumerate(TASKS.split("---")):
        (tasks_dir / f"task_{i}.yaml").write_text(task.strip() + "\n")
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_HOME")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(folder / "hf"))
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        yield lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": MODEL,
                "base_url": f"{base_url}/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(tokenizer_dir),
                "max_retries": 1,
                "num_concurrent": 1,
                "batch_size": 4,
            },
            tasks=["crossinfer_multiple_choice", "crossinfer_generate_until"],
            task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
            log_samples=True,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # lm-eval's own split: trailing spaces of the context move to the continuation, and the
    # continuation's tokens are those of context + continuation after the context's.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    head = tokenizer.encode(context, add_special_tokens=False)
    return head, whole[len(head) :]


def test_loglikelihoods_equal_transformers(
    results: dict[str, Any], smollm2_loaded: Any, hf_model: Any
) -> None:
    tokenizer = smollm2_loaded.tokenizer
    samples = results["samples"]["crossinfer_multiple_choice"]
    assert len(samples) == 5
    for sample in samples:
        for (context, continuation), (ours, _) in zip(
            sample["arguments"], sample["filtered_resps"], strict=True
        ):
            head, tail = _encode_pair(tokenizer, context, continuation)
            with torch.inference_mode():
                logits = hf_model(torch.tensor([head + tail])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            theirs = sum(float(logprobs[len(head) - 1 + i, t]) for i, t in enumerate(tail))
            assert ours == pytest.approx(theirs, abs=1e-4), (context, continuation)
    assert 0.0 <= results["results"]["crossinfer_multiple_choice"]["acc,none"] <= 1.0


def test_generate_until_answers_equal_transformers_greedy(
    results: dict[str, Any], smollm2_loaded: Any, hf_model: Any
) -> None:
    tokenizer = smollm2_loaded.tokenizer
    samples = results["samples"]["crossinfer_generate_until"]
    assert len(samples) == 3
    for sample in samples:
        context = sample["arguments"][0][0]
        ids = torch.tensor([tokenizer.encode(context, add_special_tokens=False)])
        with torch.inference_mode():
            out = hf_model.generate(
                ids,
                max_new_tokens=MAX_GEN_TOKS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for stop in [*UNTIL, tokenizer.eos_token]:
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text, context
    assert all(s["resps"][0][0].strip() for s in samples)  # real answers, not empty ones
