"""A transformers config rebuilt from a GGUF file's metadata (llama.cpp key names)."""

from __future__ import annotations

from typing import Any

from gguf import GGUFReader
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from crossinfer.loader.errors import ModelLoadError

# GGUF general.architecture -> (HF architecture, config class). Mistral GGUFs say "llama" too:
# the weights and the math are the same, so they load as LlamaForCausalLM.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, type[PretrainedConfig]]] = {
    "llama": ("LlamaForCausalLM", LlamaConfig),
    "qwen2": ("Qwen2ForCausalLM", Qwen2Config),
}

# llama.cpp's own default when a file does not state rope.freq_base.
_DEFAULT_ROPE_THETA = 10000.0


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata, with errors that name the file."""

    def __init__(self, path: str, reader: GGUFReader) -> None:
        self.path = path
        self._fields = reader.fields

    def get(self, key: str) -> Any:
        """The value stored under ``key`` (str, int, float, bool or list), or None if absent."""
        field = self._fields.get(key)
        return None if field is None else field.contents()

    def require(self, key: str) -> Any:
        """The value under ``key``; ModelLoadError when the file lacks it."""
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks the required key {key}")
        return value

    def array_length(self, key: str) -> int | None:
        """The element count of an array value, without decoding its elements."""
        field = self._fields.get(key)
        return None if field is None else len(field.data)

    def architecture(self) -> str:
        """general.architecture, checked against the architectures this loader supports."""
        arch = str(self.require("general.architecture"))
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelLoadError(
                f"{self.path}: GGUF architecture '{arch}' is not supported; supported: {supported}"
            )
        return arch


def gguf_config(meta: GGUFMetadata, tensor_names: set[str]) -> PretrainedConfig:
    """The HF config for a GGUF file, with ``architectures`` set (e.g. LlamaForCausalLM)."""
    arch = meta.architecture()
    hf_arch, config_class = SUPPORTED_ARCHITECTURES[arch]
    hidden_size = int(meta.require(f"{arch}.embedding_length"))
    num_heads = int(meta.require(f"{arch}.attention.head_count"))
    kwargs: dict[str, Any] = {
        "architectures": [hf_arch],
        "vocab_size": _vocab_size(meta, arch),
        "hidden_size": hidden_size,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or num_heads),
        "head_dim": _head_dim(meta, arch, hidden_size, num_heads),
        "max_position_embeddings": int(meta.require(f"{arch}.context_length")),
        "rms_norm_eps": float(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_parameters": _rope_parameters(meta, arch),
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # Absent ids stay None rather than taking a config class's defaults, which are one
        # checkpoint's values and would silently apply to another.
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama":
        # Some llama-architecture files (converted from models with QKV biases) carry them.
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return config_class(**kwargs)


def _vocab_size(meta: GGUFMetadata, arch: str) -> int:
    size = meta.get(f"{arch}.vocab_size")
    if size is not None:
        return int(size)
    # Many converters omit the key; the token list always has one entry per embedding row.
    count = meta.array_length("tokenizer.ggml.tokens")
    if count is None:
        raise ModelLoadError(
            f"{meta.path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens"
        )
    return count


def _head_dim(meta: GGUFMetadata, arch: str, hidden_size: int, num_heads: int) -> int:
    for key in (f"{arch}.attention.key_length", f"{arch}.rope.dimension_count"):
        value = meta.get(key)
        if value is not None:
            return int(value)
    return hidden_size // num_heads


def _rope_parameters(meta: GGUFMetadata, arch: str) -> dict[str, Any]:
    theta = meta.get(f"{arch}.rope.freq_base")
    params: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(theta) if theta is not None else _DEFAULT_ROPE_THETA,
    }
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if scaling_type is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        # Older files state linear scaling with a single key.
        scaling_type, factor = "linear", meta.get(f"{arch}.rope.scale_linear")
    if scaling_type in (None, "none") or factor is None:
        return params
    params["rope_type"] = str(scaling_type)
    params["factor"] = float(factor)
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        params["original_max_position_embeddings"] = int(original)
    return params
