"""int8 weights and activations (W8A8) for the CPU backend's linear layers.

Weights are quantised once, symmetrically, one scale per output channel; activations are
quantised per token (one scale per row) as each step runs. The int8 GEMM gives int32 sums, to
which the two scales and the bias are applied:

    y[m, n] = (sum_k xq[m, k] * wq[k, n]) * x_scale[m] * w_scale[n] + bias[n]

Three paths, one chosen per layer at load (the weight is stored in that path's layout only):

* ``int8_gemm.c`` (native, AVX-512 VNNI, shapes that tile by 16 columns and 4 inputs): one
  call quantises the rows and runs the GEMM on a weight packed once for VPDPBUSD, the scales
  and bias applied as the sums leave the registers. SmolLM2-135M's 30 layers at 32 rows on the
  project's 2-core Zen 4: 15.7 ms against 30.9 ms through ``_int_mm`` in the same run (1 row:
  3.3 against 7.7 ms; 2048 rows: 729 against 809 ms); end to end, 32 x 128/128 at 450 against
  311 tok/s (benchmarks/RESULTS.md). ``_int_mm`` repacks its weight on every call, which is
  most of its time at decode sizes.
  On a CPU with AMX, calls of 8 rows or more (in_features % 64 == 0) run on AMX tiles
  (``int8_amx.c``) over the same packed weight: the path is the C side's choice per call.
* native ends around ``torch._int_mm`` (quantize.c), for other shapes or CPUs without VNNI;
* torch alone, with the same arithmetic: ``x * (127 / absmax)`` rounded half to even.

Not oneDNN's own int8 linear (``onednn.qlinear_pointwise``): it takes one activation scale per
tensor; with unsigned activations and a prepacked weight it ran at ``_int_mm``'s speed, with
signed ones a reference path about a thousand times slower.

Applied by ``CpuBackend.quantize_model`` to the loaded, unchanged model: every ``nn.Linear``,
including a tensor-parallel wrapper's shard, becomes an :class:`Int8Linear`.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

QMAX = 127  # symmetric: -127 .. 127, so negating a weight never overflows
UNSIGNED_OFFSET = 128  # int8_gemm.c stores weights as q + 128 (VPDPBUSD's unsigned side)
LANES = 16  # int32 lanes of an AVX-512 register: output columns per packed block


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
    # QMAX / amax as one division (``QMAX / tensor`` is a reciprocal, then a product: two
    # roundings, and now and then an int one away from quantize.c's at a half)
    inverse = torch.full_like(amax, QMAX).div_(amax)
    q = torch.round(x * inverse).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, amax / QMAX


class Int8Linear(nn.Module):
    """A linear layer on int8 weights and per-token int8 activations; output in the input's
    dtype."""

    def __init__(self, linear: nn.Module, lib: ctypes.CDLL | None = None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.weight_scale = scale
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self._lib = lib
        # One weight layout, chosen here: int8_gemm.c's packed one, else _int_mm's [in, out]
        self.packed = _packs(lib, self.in_features, self.out_features)
        self.qweight = pack_weight(q) if self.packed else q.t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._lib is None:
            xq, x_scale = quantize_rows(rows)
            acc = torch._int_mm(xq, self.qweight)
            out = acc.float().mul_(x_scale).mul_(self.weight_scale)
            if self.bias is not None:
                out.add_(self.bias)
        else:
            if rows.dtype != torch.float32 or rows.stride(1) != 1:
                rows = rows.float().contiguous()
            out = self._packed_gemm(rows) if self.packed else self._native(rows)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _packed_gemm(self, rows: torch.Tensor) -> torch.Tensor:
        """int8_gemm.c: one call quantises the rows and runs the layer."""
        assert self._lib is not None
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        bias = self.bias.data_ptr() if self.bias is not None else None
        status = self._lib.int8_linear(
            out.data_ptr(), rows.data_ptr(), rows.stride(0), rows.shape[0],
            self.qweight.data_ptr(), self.weight_scale.data_ptr(), bias, self.out_features,
            self.in_features, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the int8 linear layer could not allocate its quantised rows")
        return out

    def _native(self, rows: torch.Tensor) -> torch.Tensor:
        """Shapes int8_gemm.c does not tile: the native ends around ``_int_mm``."""
        assert self._lib is not None
        num_rows, threads = rows.shape[0], torch.get_num_threads()
        xq = torch.empty(rows.shape, dtype=torch.int8)
        x_scale = torch.empty(num_rows, dtype=torch.float32)
        self._lib.quantize_rows(
            xq.data_ptr(), x_scale.data_ptr(), rows.data_ptr(), rows.stride(0), num_rows,
            self.in_features, threads,
        )  # fmt: skip
        acc = torch._int_mm(xq, self.qweight)
        out = torch.empty(num_rows, self.out_features, dtype=torch.float32)
        bias = self.bias.data_ptr() if self.bias is not None else None
        self._lib.dequantize_sums(
            out.data_ptr(), acc.data_ptr(), x_scale.data_ptr(), self.weight_scale.data_ptr(),
            bias, num_rows, self.out_features, threads,
        )  # fmt: skip
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer computes with, ``[out, in]`` fp32 (for tests and quality)."""
        q = unpack_weight(self.qweight) if self.packed else self.qweight.t()
        return q.float() * self.weight_scale[:, None]


def pack_weight(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in]`` -> int8_gemm.c's unsigned weight ``q + 128`` as ``[out / 16, in / 4,
    16, 4]``: for each block of 16 output columns, 4 consecutive inputs of the 16 columns in one
    64-byte row."""
    n, k = q.shape
    unsigned = (q.to(torch.int16) + UNSIGNED_OFFSET).to(torch.uint8)
    return unsigned.view(n // LANES, LANES, k // 4, 4).permute(0, 2, 1, 3).contiguous()


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    blocks, groups, lanes, four = packed.shape
    q = packed.permute(0, 2, 1, 3).reshape(blocks * lanes, groups * four)
    return (q.to(torch.int16) - UNSIGNED_OFFSET).to(torch.int8)


def _packs(lib: ctypes.CDLL | None, in_features: int, out_features: int) -> bool:
    """Whether int8_gemm.c runs this layer: built with AVX-512 VNNI, and shapes it tiles."""
    if lib is None or not lib.int8_gemm_available():
        return False
    return in_features % 4 == 0 and out_features % LANES == 0
