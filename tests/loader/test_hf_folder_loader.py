"""crossinfer.loader on Hugging Face folders: config, safetensors weights, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from crossinfer.loader import ModelFiles, ModelLoadError, open_model

CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
)


def tiny_model(arch: str, tied: bool = False) -> torch.nn.Module:
    """A random 2-layer model small enough to save and reload in milliseconds."""
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**sizes))
    return Qwen2ForCausalLM(Qwen2Config(**sizes))


def load_all(files: ModelFiles) -> dict[str, torch.Tensor]:
    weights = dict(files.iter_weights())
    assert len(weights) == files.num_tensors
    return weights


def assert_same_weights(loaded: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        # save_pretrained drops the tied copy; the model runner re-ties it from the config.
        expected.pop("lm_head.weight")
    assert sorted(loaded) == sorted(expected)
    for name, tensor in loaded.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_single_file_folder_loads_config_and_exact_weights(
    tmp_path: Path, arch: str, tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CROSSINFER_NO_PROGRESS", "1")
    model = tiny_model(arch, tied)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]

    files = open_model(str(tmp_path))

    assert files.path == str(tmp_path)
    expected_arch = "LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"
    assert files.config.architectures == [expected_arch]
    for field in CONFIG_FIELDS:
        assert getattr(files.config, field) == getattr(model.config, field), field
    assert files.num_tensors == (20 if tied else 21) + (6 if arch == "qwen2" else 0)
    assert_same_weights(load_all(files), model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sharded_folder_with_index_loads_exact_weights(
    tmp_path: Path, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CROSSINFER_NO_PROGRESS", "1")
    model = tiny_model(arch)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1

    files = open_model(str(tmp_path))

    assert_same_weights(load_all(files), model)


def test_stored_dtype_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSINFER_NO_PROGRESS", "1")
    model = tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)

    loaded = load_all(open_model(str(tmp_path)))

    assert {t.dtype for t in loaded.values()} == {torch.bfloat16}
    assert_same_weights(loaded, model)


def test_progress_bar_goes_to_stderr_unless_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    files = open_model(str(tmp_path))
    capsys.readouterr()

    monkeypatch.delenv("CROSSINFER_NO_PROGRESS", raising=False)
    load_all(files)
    shown = capsys.readouterr()
    monkeypatch.setenv("CROSSINFER_NO_PROGRESS", "1")
    load_all(files)
    hidden = capsys.readouterr()

    assert "Loading weights" in shown.err and "21/21" in shown.err
    assert shown.out == ""
    assert hidden.err == "" and hidden.out == ""


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model: no such file or folder"):
        open_model(str(missing))


def test_folder_without_config(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not found"):
        open_model(str(tmp_path))


def test_folder_without_safetensors(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors files") as caught:
        open_model(str(tmp_path))
    assert str(tmp_path) in str(caught.value)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.layers.1.mlp.up_proj.weight"]
    os.remove(tmp_path / shard)
    with pytest.raises(ModelLoadError, match=f"{shard}: missing"):
        open_model(str(tmp_path))


def test_truncated_safetensors_file(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors: not a complete safetensors"):
        open_model(str(tmp_path))


def test_folder_with_only_a_gguf_file_points_at_the_file(tmp_path: Path) -> None:
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as caught:
        open_model(str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: not found")
    assert message.endswith(f"pass the file itself, e.g. {tmp_path / 'model.Q8_0.gguf'}")


def test_folder_without_tokenizer_files(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    files = open_model(str(tmp_path))
    with pytest.raises(ModelLoadError) as caught:
        files.load_tokenizer()
    assert str(caught.value).startswith(f"{tmp_path}: no tokenizer files (expected one of ")
