"""The CPU backend's linear layer: oneDNN's GEMM on the reordered weight gives what the plain
GEMM gives, for every row count, with and without bias, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossinfer_cpu.linear import CpuLinear, onednn_packing_available
from crossinfer_cpu.prepare import prepare_layers

ROW_COUNTS = [1, 7, 16, 31, 32, 35, 100, 128, 129, 300]


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


def test_onednn_packing_is_used_where_available_and_the_transposed_weight_otherwise() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        layer = CpuLinear(nn.Linear(64, 64).to(dtype))
        packed = onednn_packing_available(dtype)
        assert (layer.packed is not None) == packed
        assert (layer.weight_t is None) == packed
    assert onednn_packing_available(torch.float32) == torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_layers_match_f_linear(dtype: torch.dtype) -> None:
    plain = nn.Linear(64, 48).to(dtype)
    x = torch.randn(32, 64, dtype=dtype)
    got = CpuLinear(plain)(x)
    assert got.dtype == dtype
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
