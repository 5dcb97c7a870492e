"""The gated activation of the Llama MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SiluAndMul(torch.nn.Module):
    """``silu(gate) * up`` of one fused projection's output ``[..., 2 * d]`` (gate, then up).

    May overwrite its input, which is the projection's output and used nowhere else; a backend
    may replace this module in ``prepare_model``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        # In place on the projection's output: no new [tokens, d] tensors, which on a CPU are
        # fresh pages to fault in at every prefill chunk.
        return F.silu(gate, inplace=True).mul_(up)
