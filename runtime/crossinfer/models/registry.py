"""Which model class runs which Hugging Face architecture, and how a model is built."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from crossinfer.backend import Backend
from crossinfer.distributed.tensor_parallel import TensorParallel
from crossinfer.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


class UnsupportedModelError(ValueError):
    """The config names an architecture crossinfer cannot run."""


def model_class(config: PretrainedConfig) -> type[LlamaForCausalLM]:
    """The class for ``config.architectures``, or an error listing what is supported."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in MODEL_CLASSES:
            return MODEL_CLASSES[name]
    supported = ", ".join(sorted(MODEL_CLASSES))
    raise UnsupportedModelError(
        f"architecture {names or '(none given)'} is not supported; supported: {supported}"
    )


def build_model(
    config: PretrainedConfig,
    backend: Backend,
    dtype: torch.dtype,
    max_positions: int | None = None,
    tp: TensorParallel | None = None,
) -> LlamaForCausalLM:
    """An empty model on the backend's device: parameters allocated, not initialised.

    Building on the meta device skips random initialisation, which would cost seconds for
    weights that ``load_weights`` overwrites anyway.
    """
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config, backend, dtype, max_positions, tp)
    model = model.to_empty(device=backend.device()).to(dtype)
    model.tie_weights()
    return model.eval()
