"""The CPU backend's Llama-family model computes the logits transformers computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from crossinfer.models.registry import UnsupportedModelError, build_model, model_class
from crossinfer_cpu import CpuBackend
from tests.models.paged_steps import relative_error, run_steps

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"]),
    "llama-mha-bias": lambda: LlamaConfig(
        **{**SMALL, "num_key_value_heads": 4},
        attention_bias=True,
        architectures=["LlamaForCausalLM"],
    ),
    "llama3-rope": lambda: LlamaConfig(
        **SMALL,
        architectures=["LlamaForCausalLM"],
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": lambda: MistralConfig(**SMALL, architectures=["MistralForCausalLM"]),
    "qwen2-tied": lambda: Qwen2Config(
        **{**SMALL, "num_key_value_heads": 1},
        tie_word_embeddings=True,
        architectures=["Qwen2ForCausalLM"],
    ),
}

# Step 1 prefills B's first 16 tokens and C's first 9; step 2 mixes a full prefill (A), a
# prefill after a cached prefix (B) and a decode (C); step 3 decodes A and C.
SEQ_LENS = {"A": 8, "B": 21, "C": 11}
STEPS = [
    [("B", 0, 16), ("C", 0, 9)],
    [("A", 0, 7), ("B", 16, 5), ("C", 9, 1)],
    [("C", 10, 1), ("A", 7, 1)],
]


@pytest.mark.parametrize("prepared", [False, True], ids=["reference-layers", "cpu-layers"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name: str, prepared: bool) -> None:
    """With the model's own layers, and with those the CPU backend swaps in (packed linear
    layers; native norm, rotary and activation where the native kernels could be built)."""
    config = CONFIGS[name]()
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    backend = CpuBackend()
    model = build_model(config, backend, torch.float32)
    model.load_weights(reference.state_dict().items())
    if prepared:
        model = backend.prepare_model(model)

    gen = torch.Generator().manual_seed(1)
    sequences = {
        s: torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
        for s, n in SEQ_LENS.items()
    }
    ours = run_steps(model, backend, sequences, STEPS)
    assert len(ours) == sum(SEQ_LENS.values())
    with torch.inference_mode():
        for seq, ids in sequences.items():
            expected = reference(torch.tensor([ids])).logits[0]
            actual = torch.stack([ours[(seq, p)] for p in range(len(ids))])
            assert relative_error(actual, expected) < 1e-4, (seq, relative_error(actual, expected))


def test_unsupported_architecture_lists_supported() -> None:
    config = LlamaConfig(**SMALL, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        model_class(config)


def test_missing_tensor_is_named() -> None:
    config = LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    del state["model.layers.1.self_attn.k_proj.weight"]
    model = build_model(config, CpuBackend(), torch.float32)
    with pytest.raises(ValueError, match=r"missing 1 tensors: layers\.1\.self_attn\.qkv_proj"):
        model.load_weights(state.items())


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers_reading_the_same_file(smollm2_loaded) -> None:
    """Both read the packaged GGUF: transformers with its own GGUF reader, we with ours."""
    import os

    from crossinfer.loader import default_model_path

    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    model, backend = smollm2_loaded.model, smollm2_loaded.backend
    gen = torch.Generator().manual_seed(2)
    sequences = {
        s: torch.randint(0, 49152, (n,), generator=gen).tolist() for s, n in SEQ_LENS.items()
    }
    ours = run_steps(model, backend, sequences, STEPS, block_size=16)
    with torch.inference_mode():
        for seq, ids in sequences.items():
            expected = reference(torch.tensor([ids])).logits[0]
            actual = torch.stack([ours[(seq, p)] for p in range(len(ids))])
            assert relative_error(actual, expected) < 1e-4, (seq, relative_error(actual, expected))
