"""``--load-format dummy``: a model built from its config alone, with random weights.

For benchmarks of model sizes that are not on disk (vLLM's ``--load-format dummy``). The
model is a folder holding a ``config.json`` (tokenizer files beside it are used when present),
or the name of a built-in shape (``BUILTIN_CONFIGS``: the published configs of a few common
models). No weight file is read: the engine fills every parameter in place on its device
(``fill_random``), so an 8B-parameter model costs no host memory and seconds, not minutes.

Without tokenizer files the tokenizer is a placeholder over the config's vocabulary (token ``i``
is the text ``<i>``): it detokenises any id, which is what a benchmark of token-id prompts needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from crossinfer.loader.errors import ModelLoadError
from crossinfer.loader.model_files import ModelFiles
from crossinfer.loader.tokenizer import TOKENIZER_FILES, load_folder_tokenizer

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA_3_1_8B: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": _LLAMA3_ROPE,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

BUILTIN_CONFIGS: dict[str, dict[str, object]] = {
    "llama-3.1-8b": _LLAMA_3_1_8B,
    "llama-3.2-1b": _LLAMA_3_1_8B
    | {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": _LLAMA3_ROPE | {"factor": 32.0},
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


class DummySource:
    """A WeightSource with a config and no tensors (the engine fills the weights itself)."""

    def __init__(self, config: PretrainedConfig, folder: str | None) -> None:
        self._config = config
        self._folder = folder

    @property
    def config(self) -> PretrainedConfig:
        return self._config

    @property
    def num_tensors(self) -> int:
        return 0

    def iter_tensors(self, select: object = None) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        folder = self._folder
        if folder and any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
            return load_folder_tokenizer(folder)
        return placeholder_tokenizer(self._config)


def open_dummy_model(name_or_folder: str | None) -> ModelFiles:
    """A ModelFiles of a built-in shape or a config-only folder, with no tensors to read."""
    config, folder = dummy_config(name_or_folder)
    path = folder or f"dummy:{name_or_folder}"
    return ModelFiles(path=path, config=config, num_tensors=0, source=DummySource(config, folder))


def dummy_config(name_or_folder: str | None) -> tuple[PretrainedConfig, str | None]:
    """The config of a built-in shape or of ``folder/config.json``, and the folder (or None)."""
    if name_or_folder is None:
        raise ModelLoadError(
            "--load-format dummy needs --model: a folder with a config.json, or one of "
            + ", ".join(sorted(BUILTIN_CONFIGS))
        )
    key = name_or_folder.lower()
    if key in BUILTIN_CONFIGS:
        values = dict(BUILTIN_CONFIGS[key])
        model_type = str(values.pop("model_type"))
        return AutoConfig.for_model(model_type, **values), None
    folder = os.path.expanduser(name_or_folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelLoadError(
            f"{name_or_folder}: --load-format dummy takes a folder with a config.json or a "
            f"built-in shape ({', '.join(sorted(BUILTIN_CONFIGS))})"
        )
    try:
        return AutoConfig.from_pretrained(folder), folder
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{folder}/config.json: {exc}") from exc


def placeholder_tokenizer(config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """One token per id, ``<i>``, split on whitespace; eos is the config's eos id."""
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = config.eos_token_id
    eos_id = eos[0] if isinstance(eos, list) else eos
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<0>",
        eos_token=f"<{eos_id}>" if eos_id is not None else None,
    )


@torch.no_grad()
def fill_random(model: nn.Module, seed: int) -> None:
    """Every parameter filled in place where it lives: norm weights 1, biases 0, everything
    else uniform in +-1/sqrt(fan-in) (activations stay of order one through any depth)."""
    gen_device = next(model.parameters()).device
    generator = torch.Generator(device=gen_device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            bound = param.shape[-1] ** -0.5
            param.uniform_(-bound, bound, generator=generator)
