"""The CPU backend's linear layer: the transposed and MKL-packed GEMMs give exactly what the
plain GEMM gives, for every row count (packed chunks, padded remainders, short remainders)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossinfer_cpu.linear import PACKED_MAX_ROWS, PACKED_ROWS, CpuLinear
from crossinfer_cpu.prepare import prepare_layers

ROW_COUNTS = [1, 7, PACKED_ROWS // 2 - 1, PACKED_ROWS // 2, PACKED_ROWS - 1, PACKED_ROWS]
ROW_COUNTS += [PACKED_ROWS + 3, PACKED_ROWS + PACKED_ROWS // 2, 100, PACKED_MAX_ROWS]
ROW_COUNTS += [PACKED_MAX_ROWS + 1, 300]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_every_row_count_matches_the_plain_gemm(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    plain = nn.Linear(96, 80, bias=bias)
    layer = CpuLinear(plain)
    x = torch.randn(rows, 96)
    expected = torch.addmm(plain.bias, x, plain.weight.t()) if bias else x @ plain.weight.t()
    got = layer(x)
    assert got.shape == (rows, 80)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_packing_is_used_for_fp32_with_mkl_and_not_for_bf16() -> None:
    fp32 = CpuLinear(nn.Linear(64, 64))
    assert (fp32.packed is not None) == torch.backends.mkl.is_available()
    assert CpuLinear(nn.Linear(64, 64).to(torch.bfloat16)).packed is None


def test_bf16_layer_matches_f_linear() -> None:
    plain = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(PACKED_ROWS, 64, dtype=torch.bfloat16)
    got = CpuLinear(plain)(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(
        got.float(), nn.functional.linear(x, plain.weight, plain.bias).float(), atol=1e-2, rtol=1e-2
    )


def test_prepare_layers_replaces_nested_linears_and_keeps_leading_dims() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(2, 5, 8)
    expected = model(x)
    prepare_layers(model)
    assert isinstance(model[0], CpuLinear) and isinstance(model[1][1], CpuLinear)
    assert torch.allclose(model(x), expected, atol=1e-6)
