"""A tiny random Llama saved as an HF folder, and random LoRA adapters of it made with peft,
with the greedy tokens of transformers + peft's merged model as the reference."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from crossinfer_conformance.checks.tiny_model import build_tiny_model

SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.2,  # logits far apart: greedy choices with margins
    bos_token_id=1,
    eos_token_id=2,
)
# Different ranks, targets and scalings; B is random (init_lora_weights=False), not zero.
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": dict(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    ),
    "rs": dict(
        r=16,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["k_proj", "o_proj", "up_proj", "down_proj"],
    ),
}
SHARED = list(range(10, 34))  # three blocks of 8
PROMPTS = [SHARED + [40, 41, 42], SHARED + [50, 51], [7, 8, 9, 60]]
NEW_TOKENS = 12


def tiny_llama(folder: Path) -> Path:
    """The base model with the conformance suite's word-level tokenizer."""
    tokens = build_tiny_model(folder / "tokenizer", head_size=16, seed=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        AutoModelForCausalLM.from_config(
            LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"])
        ).save_pretrained(folder / "base")
    for file in tokens.glob("*token*"):
        shutil.copy(file, folder / "base")
    return folder / "base"


def make_adapter(base: Path, folder: Path, seed: int, **lora: Any) -> list[list[int]]:
    """Save a random adapter of ``base`` into ``folder``; returns the merged model's greedy
    tokens for ``PROMPTS``."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(folder)
    return greedy(peft_model.merge_and_unload())


def greedy(model: Any) -> list[list[int]]:
    tokens = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.eval().generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            tokens.append(out[0, ids.shape[1] :].tolist())
    return tokens
