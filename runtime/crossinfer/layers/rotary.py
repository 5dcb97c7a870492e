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
    activation dtype, as transformers does. Only its first half is kept: the second half of
    each row repeats the first.
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
        # Kept as plain attributes, not buffers: weights are materialised from the meta device
        # and must not wipe this table.
        self.cos = (freqs.cos() * scaling).to(dtype=dtype, device=device)
        self.sin = (freqs.sin() * scaling).to(dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions`` ([num_tokens]), each [num_tokens, 1, head_dim // 2].
        Computed once per step and shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ([num_tokens, heads, head_dim]) by the looked-up ``cos`` and ``sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Rotate(torch.nn.Module):
    """Applies the looked-up rotation to a layer's query and key heads.

    A module, not only a function, so that a backend can replace it in ``prepare_model`` with
    one that rotates in place; callers use the returned tensor and do not read ``x`` again.
    """

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin)
