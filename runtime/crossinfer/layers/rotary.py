"""Rotary position embedding, with the frequencies transformers computes for the config."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_parameters(config: PretrainedConfig) -> dict:
    """The config's rope settings, whichever attribute this transformers version keeps them in."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale (yarn and longrope scale attention)."""
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    init = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    with torch.device("cpu"):  # the model may be under construction on the meta device
        inv_freq, scaling = init(config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(torch.nn.Module):
    """Rotates query and key heads by position (the "rotate half" layout of HF Llama).

    The cos/sin table is computed once in fp32 for ``max_positions`` and cast to the
    activation dtype, as transformers does.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        head_dim: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq)  # [max_positions, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        # Kept as plain attributes, not buffers: weights are materialised from the meta device
        # and must not wipe this table.
        self.cos = (emb.cos() * scaling).to(dtype=dtype, device=device)
        self.sin = (emb.sin() * scaling).to(dtype=dtype, device=device)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # query: [num_tokens, num_heads, head_dim]; key: [num_tokens, num_kv_heads, head_dim]
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
