"""The model's per-token layers on the native kernels of ``pointwise.c``: RMSNorm (the residual
add folded in), rotary embedding in place, and SiLU-and-multiply.

Each replaces a reference layer of ``crossinfer.layers`` and computes the same thing, in fp32
only; any other dtype or layout goes to the reference implementation it inherits. At decode
sizes the reference layers cost more in operator dispatch and fresh allocations than in
arithmetic (several operators each, every layer, every step); these are one call each.
"""

from __future__ import annotations

import ctypes

import torch

from crossinfer.layers.activation import SiluAndMul
from crossinfer.layers.norm import RMSNorm
from crossinfer.layers.rotary import Rotate


def _fp32_rows(t: torch.Tensor) -> bool:
    """A 2-d fp32 tensor whose rows are contiguous (the row stride may be anything)."""
    return t.dtype == torch.float32 and t.dim() == 2 and t.stride(1) == 1


class CpuRMSNorm(RMSNorm):
    def __init__(self, norm: RMSNorm, lib: ctypes.CDLL) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self._lib = lib

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_fp32_rows(x) and self.weight.dtype == torch.float32):
            return super().forward(x)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self._lib.rms_norm(
            out.data_ptr(),
            out.stride(0),
            x.data_ptr(),
            x.stride(0),
            self.weight.data_ptr(),
            x.shape[0],
            x.shape[1],
            self.eps,
            torch.get_num_threads(),
        )
        return out

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: ``residual`` becomes the sum, ``x`` its norm."""
        fits = _fp32_rows(x) and _fp32_rows(residual) and x.shape == residual.shape
        if not (fits and self.weight.dtype == torch.float32):
            return super().add_and_norm(x, residual)
        self._lib.add_rms_norm(
            x.data_ptr(),
            x.stride(0),
            residual.data_ptr(),
            residual.stride(0),
            self.weight.data_ptr(),
            x.shape[0],
            x.shape[1],
            self.eps,
            torch.get_num_threads(),
        )
        return x, residual


class CpuRotate(Rotate):
    def __init__(self, lib: ctypes.CDLL) -> None:
        super().__init__()
        self._lib = lib

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """In place, when ``x`` ([tokens, heads, head_size]) keeps each token's heads together."""
        tokens, num_heads, head_size = x.shape
        fits = (
            x.dtype == cos.dtype == sin.dtype == torch.float32
            and x.stride(2) == 1
            and x.stride(1) == head_size
            and cos.is_contiguous()
            and sin.is_contiguous()
            and cos.numel() == sin.numel() == tokens * (head_size // 2)
        )
        if not fits:
            return super().forward(x, cos, sin)
        self._lib.rotary(
            x.data_ptr(),
            x.stride(0),
            num_heads,
            head_size,
            cos.data_ptr(),
            sin.data_ptr(),
            tokens,
            torch.get_num_threads(),
        )
        return x


class CpuSiluAndMul(SiluAndMul):
    def __init__(self, lib: ctypes.CDLL) -> None:
        super().__init__()
        self._lib = lib

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Into a new contiguous tensor: a strided view of ``x`` would make MKL's packed GEMM
        (the next layer at decode sizes) copy it first (1.5-4.7 ms per step at 32 rows,
        measured; prefill was the same either way)."""
        if not _fp32_rows(x):
            return super().forward(x)
        rows, width = x.shape
        out = x.new_empty(rows, width // 2)
        self._lib.silu_and_mul(
            out.data_ptr(), x.data_ptr(), x.stride(0), rows, width // 2, torch.get_num_threads()
        )
        return out
