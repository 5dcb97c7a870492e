"""A CPU layout for linear layers: the weight reordered once into oneDNN's blocked layout.

Measured on the project's 2-core AVX-512 machine (AMD EPYC, torch 2.13; all 30 layers of
SmolLM2-135M with their weights streamed from memory as in a real step, fp32):

| rows | ``F.linear`` | oneDNN, weight pre-reordered |
|---|---|---|
| 1 | 45 ms (4.7 GFLOP/s) | 23 ms (9.4) |
| 32 | 99 ms (69) | 43 ms (157) |
| 128 | 259 ms (105) | 177 ms (154) |
| 2048 | 2819 ms (154) | 2070 ms (210) |

``torch.ops.mkldnn._reorder_linear_weight`` packs the weight into the blocked layout oneDNN's
GEMM reads, once at load; ``torch.ops.mkldnn._linear_pointwise`` runs ``x @ w.T + b`` on it for
any row count. MKL's own GEMM (``F.linear`` and its packed variant, which an earlier version of
this file used) is two times slower at decode sizes on this AMD machine. Results agree with
``F.linear`` to fp32 rounding; they are not bitwise equal to it.

Where oneDNN cannot take the dtype (fp16 without AVX512-FP16, or a torch built without it) the
layer keeps the weight transposed (``[in, out]``) for ``torch.mm``, which MKL runs about twice
as fast as the checkpoint's ``[out, in]`` at decode sizes on an Intel Xeon.

The model file stays plain: ``prepare_model`` swaps the layers after loading.
"""

from __future__ import annotations

import torch
from torch import nn


def onednn_packing_available(dtype: torch.dtype) -> bool:
    """oneDNN's packed linear: fp32 always; bf16 / fp16 where the CPU has the instructions."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


class CpuLinear(nn.Module):
    """``y = x @ weight.T + bias`` on a weight packed for oneDNN (or transposed for MKL)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.packed: torch.Tensor | None = None
        self.weight_t: torch.Tensor | None = None
        if onednn_packing_available(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        else:
            self.weight_t = weight.t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        elif self.bias is None:
            out = torch.mm(rows, self.weight_t)
        else:
            out = torch.addmm(self.bias, rows, self.weight_t)
        return out.view(*x.shape[:-1], self.out_features)
