"""``--load-format dummy``: the built-in shapes give the published models' parameter shapes, a
folder with only a config.json serves, and nothing asks for weight files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossinfer.backend import Backend
from crossinfer.loader.dummy import BUILTIN_CONFIGS, dummy_config, placeholder_tokenizer
from crossinfer.loader.errors import ModelLoadError
from crossinfer.models.llama import LlamaForCausalLM
from crossinfer_cpu import CpuBackend

# Published parameter counts (embedding, and a separate LM head when untied, included).
PARAMETERS = {"llama-3.1-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400}


def _meta_model(name: str, backend: Backend) -> LlamaForCausalLM:
    config, _ = dummy_config(name)
    with torch.device("meta"):
        return LlamaForCausalLM(config, backend, torch.bfloat16, 4096)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_builtin_shapes_have_the_published_parameter_counts(name: str) -> None:
    model = _meta_model(name, CpuBackend())
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


def test_llama_8b_layer_shapes() -> None:
    params = dict(_meta_model("llama-3.1-8b", CpuBackend()).named_parameters())
    assert params["layers.0.self_attn.qkv_proj.weight"].shape == (4096 + 2 * 1024, 4096)
    assert params["layers.0.self_attn.o_proj.weight"].shape == (4096, 4096)
    assert params["layers.0.mlp.gate_up_proj.weight"].shape == (2 * 14336, 4096)
    assert params["layers.31.mlp.down_proj.weight"].shape == (4096, 14336)
    assert params["lm_head.weight"].shape == (128256, 4096)
    assert set(BUILTIN_CONFIGS) >= set(PARAMETERS)


def test_a_config_only_folder_generates_with_the_placeholder_tokenizer(tmp_path: Path) -> None:
    from crossinfer.llm import LLM
    from crossinfer.sampling_params import SamplingParams

    config = dict(BUILTIN_CONFIGS["smollm2-135m"]) | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(model=str(tmp_path), load_format="dummy", device="cpu", kv_cache_memory=1 << 24)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    tokens = out[0].outputs[0].token_ids
    assert len(tokens) == 8 and all(0 <= t < 300 for t in tokens)
    assert out[0].outputs[0].text.split() == [f"<{t}>" for t in tokens]
    params = list(llm.engine.parts.loaded.model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(p.abs().sum() > 0 for p in params)  # filled, not left empty or zero


def test_the_placeholder_tokenizer_round_trips_ids() -> None:
    config, _ = dummy_config("smollm2-135m")
    tok = placeholder_tokenizer(config)
    assert tok.decode([17, 49151]) == "<17> <49151>"
    assert tok.encode("<17> <49151>", add_special_tokens=False) == [17, 49151]
    assert tok.eos_token_id == 2


def test_bad_dummy_models_say_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="llama-3.1-8b"):
        dummy_config(str(tmp_path))  # no config.json
    with pytest.raises(ModelLoadError, match="needs --model"):
        dummy_config(None)
