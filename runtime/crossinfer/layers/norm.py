"""RMSNorm, computed in fp32 as transformers does."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    """``weight * x / rms(x)`` over the last axis.

    A backend may replace this module in ``prepare_model`` with one that computes the same in
    fewer passes; :meth:`add_and_norm` lets it fold the residual add in.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``. The sum is taken in the activation dtype, as
        transformers does. An implementation may reuse the storage of ``x`` and ``residual``
        for the results: callers pass tensors they no longer need."""
        residual = x + residual
        return self(residual), residual
