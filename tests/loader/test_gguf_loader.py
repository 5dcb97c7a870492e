"""crossinfer.loader on GGUF files written here with gguf.GGUFWriter (llama.cpp layout)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from crossinfer.loader import ModelFiles, ModelLoadError, open_model

# One stored tensor: GGUF name, data (float array, or packed uint8 blocks), packed type.
Stored = tuple[str, np.ndarray, Q | None]

_TOP_LEVEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Where the fp16 super-block scales sit in each K-quant block; random bytes there could be
# NaN or inf, so the tests put a fixed finite scale in them.
_K_QUANT_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2)}
_K_QUANT_SCALE_OFFSETS[Q.Q6_K] = (208,)


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    assert match is not None, hf_name
    return f"blk.{match[1]}.{_LAYER_PARTS[match[2]]}.{match[3]}"


def llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to attn_q / attn_k rows for llama models."""
    half = rows.shape[0] // num_heads // 2
    grouped = rows.reshape(num_heads, 2, half, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


def permuted_heads(name: str, arch: str, num_heads: int, num_kv_heads: int) -> int | None:
    if arch != "llama":
        return None
    if ".attn_q." in name:
        return num_heads
    if ".attn_k." in name:
        return num_kv_heads
    return None


def write_gguf(
    path: Path,
    arch: str,
    metadata: dict[str, Any],
    tensors: Sequence[Stored],
    tokens: list[str] | None = None,
) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    if tokens is not None:
        writer.add_token_list(tokens)
    for name, data, raw_type in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_metadata(arch: str, config: Any) -> dict[str, Any]:
    metadata = {
        f"{arch}.vocab_size": config.vocab_size,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    if arch == "llama":
        metadata[f"{arch}.rope.dimension_count"] = config.hidden_size // config.num_attention_heads
    return metadata


def tiny_model(arch: str, tied: bool, bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(attention_bias=bias, **sizes))
    return Qwen2ForCausalLM(Qwen2Config(**sizes))


def store(values: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    if qtype == Q.F32:
        return values.astype(np.float32), None
    if qtype == Q.F16:
        return values.astype(np.float16), None
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def model_to_gguf(path: Path, arch: str, model: torch.nn.Module, qtype: Q) -> None:
    """Write ``model`` as llama.cpp would: GGUF names, q/k permuted, 2-D weights as ``qtype``."""
    config = model.config
    tensors: list[Stored] = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = gguf_name(hf_name)
        values = tensor.numpy()
        heads = permuted_heads(name, arch, config.num_attention_heads, config.num_key_value_heads)
        if heads is not None:
            values = llama_cpp_permute(values, heads)
        data, raw_type = store(values, qtype if values.ndim == 2 else Q.F32)
        tensors.append((name, data, raw_type))
    write_gguf(path, arch, llama_cpp_metadata(arch, config), tensors)


def load_all(files: ModelFiles) -> dict[str, torch.Tensor]:
    weights = dict(files.iter_weights())
    assert len(weights) == files.num_tensors
    return weights


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSINFER_NO_PROGRESS", "1")


@pytest.mark.parametrize(
    ("arch", "tied", "bias"),
    [("llama", False, False), ("llama", True, True), ("qwen2", True, False)],
)
def test_f32_gguf_gives_back_the_hf_weights_exactly(
    tmp_path: Path, arch: str, tied: bool, bias: bool
) -> None:
    model = tiny_model(arch, tied, bias)
    path = tmp_path / "tiny.gguf"
    model_to_gguf(path, arch, model, Q.F32)

    files = open_model(str(path))
    loaded = load_all(files)

    expected = model.state_dict()
    if tied:
        expected.pop("lm_head.weight")
    assert sorted(loaded) == sorted(expected)
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected[name]), name
    config = files.config
    assert config.architectures == ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"]
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (256, 64, 128)
    assert (config.num_hidden_layers, config.num_attention_heads) == (2, 4)
    assert (config.num_key_value_heads, config.head_dim) == (2, 16)
    assert config.max_position_embeddings == 128
    assert config.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.tie_word_embeddings is tied
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, None)
    if arch == "llama":
        assert config.attention_bias is bias


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda t: t.name
)
def test_quantised_gguf_equals_gguf_dequantize_with_permutation_undone(
    tmp_path: Path, qtype: Q
) -> None:
    model = tiny_model("llama", tied=False)
    path = tmp_path / "tiny.gguf"
    model_to_gguf(path, "llama", model, qtype)

    loaded = load_all(open_model(str(path)))

    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {qtype}
    hf_names = {gguf_name(name): name for name in model.state_dict()}
    for stored in reader.tensors:
        hf_name = hf_names[stored.name]
        reference = gguf.quants.dequantize(stored.data, stored.tensor_type)
        ours = loaded[hf_name].numpy()
        heads = permuted_heads(stored.name, "llama", 4, 2)
        if heads is not None:
            ours = llama_cpp_permute(ours, heads)
        assert ours.shape == reference.shape, hf_name
        assert np.array_equal(ours, reference), hf_name
    if qtype == Q.Q8_0:
        # The round trip stays within Q8_0's step (max |w| / 127 per block of 32).
        original = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
        error = (loaded["model.layers.0.self_attn.q_proj.weight"] - original).abs().max()
        assert error <= original.abs().max() / 127


def random_k_quant_blocks(rows: int, cols: int, qtype: Q, seed: int) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in _K_QUANT_SCALE_OFFSETS[qtype]:
        blocks[:, offset : offset + 2] = scale
    return blocks.reshape(rows, cols // block_size * type_size)


@pytest.mark.parametrize("qtype", list(_K_QUANT_SCALE_OFFSETS), ids=lambda t: t.name)
def test_k_quant_tensors_equal_gguf_dequantize(tmp_path: Path, qtype: Q) -> None:
    # gguf.quants cannot quantise K-quants, so the file holds random blocks with sane scales.
    arch, hidden = "llama", 256
    metadata = {
        f"{arch}.context_length": 64,
        f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": hidden,
        f"{arch}.block_count": 1,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.vocab_size": 8,
    }
    # GGUF name -> (HF name, rows); every row is one 256-wide K-quant super-block.
    shapes = {
        "token_embd.weight": ("model.embed_tokens.weight", 8),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", 256),
        "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", 128),
        "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", 256),
    }
    tensors = [
        (name, random_k_quant_blocks(rows, hidden, qtype, seed), qtype)
        for seed, (name, (_, rows)) in enumerate(shapes.items())
    ]
    path = tmp_path / "kquant.gguf"
    write_gguf(path, arch, metadata, tensors)

    loaded = load_all(open_model(str(path)))

    assert sorted(loaded) == sorted(hf_name for hf_name, _ in shapes.values())
    for name, data, _ in tensors:
        hf_name, rows = shapes[name]
        reference = gguf.quants.dequantize(data, qtype)
        ours = loaded[hf_name].numpy()
        heads = permuted_heads(name, arch, 4, 2)
        if heads is not None:
            ours = llama_cpp_permute(ours, heads)
        assert ours.shape == (rows, hidden)
        assert np.isfinite(ours).all()
        assert np.array_equal(ours, reference), name


def minimal_llama_metadata() -> dict[str, Any]:
    return llama_cpp_metadata("llama", tiny_model("llama", tied=True).config)


def one_tensor_file(path: Path, arch: str, metadata: dict[str, Any], stored: Stored) -> str:
    write_gguf(path, arch, metadata, [stored])
    return str(path)


def test_vocab_size_from_token_list_and_rope_scaling(tmp_path: Path) -> None:
    path = tmp_path / "scaled.gguf"
    metadata = minimal_llama_metadata()
    del metadata["llama.vocab_size"]
    metadata["llama.rope.scaling.type"] = "linear"
    metadata["llama.rope.scaling.factor"] = 4.0
    metadata["llama.rope.scaling.original_context_length"] = 32
    norm = ("output_norm.weight", np.ones(64, dtype=np.float32), None)
    write_gguf(path, "llama", metadata, [norm], tokens=[f"t{i}" for i in range(300)])

    config = open_model(str(path)).config

    assert config.vocab_size == 300
    assert config.rope_parameters == {
        "rope_type": "linear",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
    }


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip archive")
    with pytest.raises(ModelLoadError, match="weights.gguf: not a GGUF file"):
        open_model(str(path))


def test_truncated_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    model_to_gguf(path, "llama", tiny_model("llama", tied=True), Q.F32)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(ModelLoadError, match="cut.gguf: truncated or corrupt GGUF file"):
        open_model(str(path))


def test_unsupported_tensor_type_is_named_with_the_supported_ones(tmp_path: Path) -> None:
    _, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    blocks = np.zeros((64, 2 * type_size), dtype=np.uint8)
    path = one_tensor_file(
        tmp_path / "iq4.gguf",
        "llama",
        minimal_llama_metadata(),
        ("blk.0.ffn_up.weight", blocks, Q.IQ4_NL),
    )
    with pytest.raises(ModelLoadError) as caught:
        open_model(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: tensor blk.0.ffn_up.weight is stored as IQ4_NL")
    assert "supported types: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K" in message
    assert message.endswith("Q6_K, BF16")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    metadata = {"gpt2.block_count": 1, "gpt2.embedding_length": 64}
    stored = ("output_norm.weight", np.ones(64, dtype=np.float32), None)
    path = one_tensor_file(tmp_path / "gpt2.gguf", "gpt2", metadata, stored)
    with pytest.raises(ModelLoadError) as caught:
        open_model(path)
    assert str(caught.value) == (
        f"{path}: GGUF architecture 'gpt2' is not supported; supported: llama, qwen2"
    )


def test_missing_metadata_key_is_named(tmp_path: Path) -> None:
    metadata = minimal_llama_metadata()
    del metadata["llama.block_count"]
    stored = ("output_norm.weight", np.ones(64, dtype=np.float32), None)
    path = one_tensor_file(tmp_path / "nokey.gguf", "llama", metadata, stored)
    with pytest.raises(ModelLoadError) as caught:
        open_model(path)
    assert str(caught.value) == f"{path}: GGUF metadata lacks the required key llama.block_count"


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    stored = ("blk.0.attn_q_norm.weight", np.ones(16, dtype=np.float32), None)
    path = one_tensor_file(tmp_path / "qknorm.gguf", "llama", minimal_llama_metadata(), stored)
    with pytest.raises(ModelLoadError) as caught:
        open_model(path)
    assert str(caught.value) == (
        f"{path}: unexpected tensor blk.0.attn_q_norm.weight for a llama model"
    )
