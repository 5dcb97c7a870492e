"""The embedded SmolLM2-135M with a random rank-8 adapter on every projection: greedy tokens of
the adapter and of the base model, in one batch, equal transformers + peft's merged model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from crossinfer import LLM, LoRARequest, SamplingParams
from crossinfer.engine.setup import EngineConfig, load_model

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    "]
NEW_TOKENS = 16


def test_smollm2_adapter_matches_the_merged_model(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    loaded = load_model(EngineConfig(device="cpu", enable_lora=True))
    files = loaded.model_files
    model = AutoModelForCausalLM.from_config(files.config, dtype=torch.float32).eval()
    model.load_state_dict(dict(files.iter_weights()), strict=False)
    model.tie_weights()
    ids = [loaded.tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]

    def greedy(hf: torch.nn.Module) -> list[list[int]]:
        with torch.inference_mode():
            return [
                hf.generate(  # type: ignore[operator]
                    i, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                    pad_token_id=loaded.tokenizer.eos_token_id,
                )[0, i.shape[1] :].tolist()
                for i in ids
            ]  # fmt: skip

    base = greedy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = greedy(peft_model.merge_and_unload())
    assert expected != base

    llm = LLM(device="cpu", loaded=loaded, enable_lora=True, kv_cache_memory=64 << 20)
    lora = LoRARequest("smol", 1, str(tmp_path / "adapter"))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS * 2, params, lora_request=[lora, lora, None, None])
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected + base
