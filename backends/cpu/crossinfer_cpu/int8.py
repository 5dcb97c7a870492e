"""int8 weights and activations (W8A8) for the CPU backend's linear layers.

Weights are quantised once, symmetrically, one scale per output channel; activations are
quantised per token (one scale per row) as each step runs. The GEMM is ``torch._int_mm`` (int8
in, int32 out; oneDNN's VNNI kernel on CPUs that have it), then the two scales and the bias
are applied to the int32 sums:

    y[m, n] = (sum_k xq[m, k] * wq[k, n]) * x_scale[m] * w_scale[n] + bias[n]

Why ``_int_mm``: on the project's 2-core AMD EPYC (AVX-512 VNNI) all 30 layers of SmolLM2-135M
run in 21.6 ms at 32 rows (315 GOPS) against 43 ms for the oneDNN fp32 layer (linear.py) and
99 ms for ``F.linear``; at one row, 12 ms (the int8 weights streamed from memory) against 23.
oneDNN's own int8 linear (``onednn.qlinear_pointwise``) takes only one activation scale per
tensor; with unsigned activations and a prepacked weight it ran at ``_int_mm``'s speed (24 ms
against 25 at 32 rows), with signed ones a reference path about a thousand times slower.

Applied by ``CpuBackend.quantize_model`` to the loaded, unchanged model: every ``nn.Linear``,
including a tensor-parallel wrapper's shard, becomes an :class:`Int8Linear`. The native kernels
(``quantize.c``) quantise the rows and apply the scales in one pass each when they are built
(fp32 activations); torch does it otherwise, with the same arithmetic: ``x * (127 / absmax)``
rounded half to even.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

QMAX = 127  # symmetric: -127 .. 127, so negating a weight never overflows


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (int8 ``[out, in]``, fp32 scales ``[out]``), symmetric."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / QMAX
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[m, k]`` float -> (int8 ``[m, k]``, fp32 scales ``[m, 1]``), one scale per row."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    q = torch.round(x * (QMAX / amax)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, amax / QMAX


class Int8Linear(nn.Module):
    """A linear layer on int8 weights and per-token int8 activations; output in the input's
    dtype."""

    def __init__(self, linear: nn.Module, lib: ctypes.CDLL | None = None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.qweight_t = q.t().contiguous()  # [in, out]: _int_mm's second operand
        self.weight_scale = scale
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self._lib = lib

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._lib is not None and rows.dtype == torch.float32 and rows.stride(1) == 1:
            out = self._native(rows)
        else:
            xq, x_scale = quantize_rows(rows)
            acc = torch._int_mm(xq, self.qweight_t)
            out = acc.float().mul_(x_scale).mul_(self.weight_scale)
            if self.bias is not None:
                out.add_(self.bias)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _native(self, rows: torch.Tensor) -> torch.Tensor:
        assert self._lib is not None
        num_rows, threads = rows.shape[0], torch.get_num_threads()
        xq = torch.empty(rows.shape, dtype=torch.int8)
        x_scale = torch.empty(num_rows, dtype=torch.float32)
        self._lib.quantize_rows(
            xq.data_ptr(), x_scale.data_ptr(), rows.data_ptr(), rows.stride(0), num_rows,
            self.in_features, threads,
        )  # fmt: skip
        acc = torch._int_mm(xq, self.qweight_t)
        out = torch.empty(num_rows, self.out_features, dtype=torch.float32)
        bias = self.bias.data_ptr() if self.bias is not None else None
        self._lib.dequantize_sums(
            out.data_ptr(), acc.data_ptr(), x_scale.data_ptr(), self.weight_scale.data_ptr(),
            bias, num_rows, self.out_features, threads,
        )  # fmt: skip
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, ``[out, in]`` fp32 (for tests and quality)."""
        return self.qweight_t.t().float() * self.weight_scale[:, None]
