"""The CPU backend's int8 (W8A8) linear layer: it computes exactly the integer arithmetic it
claims, its error against the fp32 layer stays within the stated bound, and
``quantize_model`` swaps every linear of a model, tensor-parallel shards included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossinfer_cpu import CpuBackend
from crossinfer_cpu.int8 import QMAX, Int8Linear, quantize_per_channel, quantize_rows

# Normalised error ||y_int8 - y_fp32|| / ||y_fp32|| for Gaussian inputs and weights: per-channel
# weights and per-token activations each add about 1/(QMAX * sqrt(12)) relative rounding noise
# per element, around 0.5% together; the bound leaves room for heavier-tailed rows.
INT8_REL_ERROR = 0.02


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("rows", [1, 5, 32, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_layer_is_the_integer_gemm_it_claims(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    plain = nn.Linear(96, 80, bias=bias)
    layer = Int8Linear(plain)
    x = torch.randn(rows, 96)
    wq, w_scale = quantize_per_channel(plain.weight)
    xq, x_scale = quantize_rows(x)
    exact = (xq.double() @ wq.double().t()) * x_scale.double() * w_scale.double()
    if bias:
        exact += plain.bias.double()
    got = layer(x)
    assert got.shape == (rows, 80) and got.dtype == torch.float32
    assert torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-5)
    assert _rel_error(got, plain(x).detach()) < INT8_REL_ERROR


def test_quantisation_is_symmetric_per_channel_and_per_token() -> None:
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -2.0], [0.0, 0.0, 0.0]])
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8
    assert q[0].tolist() == [64, -QMAX, 32] and q[1].tolist() == [QMAX, 0, -QMAX]
    assert q[2].tolist() == [0, 0, 0] and torch.isfinite(scale).all()  # a zero row stays zero
    assert torch.allclose(scale[:2], torch.tensor([1.0, 2.0]) / QMAX)
    xq, x_scale = quantize_rows(torch.tensor([[3.0, -1.5], [0.0, 0.0]]))
    assert xq[0].tolist() == [QMAX, -64] and xq[1].tolist() == [0, 0]
    assert x_scale.shape == (2, 1)


def test_leading_dims_and_bf16_inputs() -> None:
    torch.manual_seed(0)
    plain = nn.Linear(64, 48)
    layer = Int8Linear(plain)
    x = torch.randn(2, 3, 64)
    assert layer(x).shape == (2, 3, 48)
    xb = x.to(torch.bfloat16)
    out = layer(xb)
    assert out.dtype == torch.bfloat16
    assert _rel_error(out, plain(x).detach()) < INT8_REL_ERROR


def test_quantize_model_swaps_every_linear_and_the_capabilities_say_so() -> None:
    backend = CpuBackend()
    assert "int8" in backend.capabilities().quantizations

    class Shard(nn.Module):  # a tensor-parallel wrapper's shape: the linear is ``inner``
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Shard())
    x = torch.randn(4, 8)
    want = model(x).detach()
    backend.quantize_model(model, "int8")
    assert isinstance(model[0], Int8Linear) and isinstance(model[2].inner, Int8Linear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert _rel_error(model(x), want) < 2 * INT8_REL_ERROR
    with pytest.raises(ValueError, match="int8"):
        backend.quantize_model(model, "fp4")


def test_the_native_ends_give_the_torch_path_exactly() -> None:
    from crossinfer_cpu import native

    lib = native.library()
    if lib is None:
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    torch.manual_seed(3)
    plain = nn.Linear(200, 72)
    x = torch.randn(37, 200) * torch.logspace(-2, 2, 200)  # rows with outlier channels
    x[5] = 0.0  # an all-zero row
    reference, fast = Int8Linear(plain), Int8Linear(plain, lib)
    assert torch.allclose(fast(x), reference(x), rtol=1e-6, atol=1e-6)
    strided = torch.randn(9, 400)[:, :200]  # rows with a stride: native too
    assert torch.allclose(fast(strided), reference(strided), rtol=1e-6, atol=1e-6)


def test_native_and_torch_quantisation_give_the_same_ints_at_every_half() -> None:
    """quantize.c and quantize_rows round the same products: over 8M Gaussian activations
    (where about 7 land within an ulp of a half) not one int differs."""
    from crossinfer_cpu import native

    lib = native.library()
    if lib is None:
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    torch.manual_seed(316)
    rows, cols = 2000, 4096
    x = torch.randn(rows, cols)
    want, want_scale = quantize_rows(x)
    got, got_scale = torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows)
    lib.quantize_rows(got.data_ptr(), got_scale.data_ptr(), x.data_ptr(), cols, rows, cols, 2)
    assert int((got != want).sum()) == 0
    assert torch.allclose(got_scale, want_scale.flatten(), rtol=1e-6, atol=0)


def _integer_gemm(plain: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What an int8 layer over ``plain`` claims to compute, in float64: the integer GEMM of
    the quantised rows and weight, scaled, plus the bias."""
    wq, w_scale = quantize_per_channel(plain.weight)
    xq, x_scale = quantize_rows(x)
    exact = (xq.double() @ wq.double().t()) * x_scale.double() * w_scale.double()
    return exact + plain.bias.double()


def _vnni_library():
    from crossinfer_cpu import native

    lib = native.library()
    if lib is None:
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    if not lib.int8_gemm_available():
        pytest.skip("the native kernels were built without AVX-512 VNNI")
    return lib


# rows: tiles of 4 with every remainder, and more than one chunk of 96 rows; out_features:
# panels of 4 blocks of 16 columns with every remainder
@pytest.mark.parametrize("rows", [1, 3, 6, 37, 200])
@pytest.mark.parametrize("out_features", [16, 48, 80, 112])
def test_the_vnni_kernel_is_the_signed_integer_gemm(rows: int, out_features: int) -> None:
    lib = _vnni_library()
    torch.manual_seed(rows * out_features)
    plain = nn.Linear(200, out_features)
    layer = Int8Linear(plain, lib)
    assert layer.packed
    x = torch.randn(rows, 200) * torch.logspace(-2, 2, 200)
    got = layer(x)
    assert torch.allclose(got.double(), _integer_gemm(plain, x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(got, Int8Linear(plain)(x), rtol=1e-6, atol=1e-6)  # the _int_mm path


def test_the_packed_layer_takes_strided_and_bf16_rows_and_gives_its_weight_back() -> None:
    lib = _vnni_library()
    torch.manual_seed(1)
    plain = nn.Linear(64, 32, bias=False)
    layer, reference = Int8Linear(plain, lib), Int8Linear(plain)
    strided = torch.randn(5, 128)[:, :64]
    assert torch.allclose(layer(strided), reference(strided), rtol=1e-6, atol=1e-6)
    xb = torch.randn(3, 64).to(torch.bfloat16)
    assert layer(xb).dtype == torch.bfloat16
    assert torch.equal(layer(xb), reference(xb))
    assert torch.equal(layer.dequantized_weight(), reference.dequantized_weight())
    odd = Int8Linear(nn.Linear(64, 40), lib)  # 40 columns do not tile by 16: _int_mm's layout
    assert not odd.packed and odd(strided).shape == (5, 40)


@pytest.fixture
def amx_library():
    """The native library with its int8 layers on AMX; VNNI again afterwards only if that is
    how it was (the library is the process's)."""
    lib = _vnni_library()
    if not lib.int8_amx_enable(1):
        pytest.skip("this CPU (or kernel) gives no AMX tiles")
    yield lib
    lib.int8_amx_enable(1)


# rows: below the AMX threshold (8), partial tiles of 16 and blocks of 32, and more than one
# chunk of rows (k = 4096: 256 rows a chunk); out_features: an odd number of 16-column blocks
@pytest.mark.parametrize(
    "rows,in_features", [(7, 64), (8, 64), (17, 192), (33, 576), (100, 128), (300, 4096)]
)
@pytest.mark.parametrize("out_features", [16, 48, 96])
def test_the_amx_kernel_is_the_signed_integer_gemm(
    rows: int, in_features: int, out_features: int, amx_library
) -> None:
    torch.manual_seed(rows + out_features)
    plain = nn.Linear(in_features, out_features)
    layer = Int8Linear(plain, amx_library)
    assert layer.packed
    assert amx_library.int8_amx_wants(rows, in_features) == (rows >= 8)
    x = torch.randn(rows, in_features)  # every 64 inputs (one tile of k) count alike
    got = layer(x)
    assert torch.allclose(got.double(), _integer_gemm(plain, x), rtol=1e-5, atol=1e-5)
    amx_library.int8_amx_enable(0)  # the same layer on the VNNI loop
    assert not amx_library.int8_amx_wants(rows, in_features)
    assert torch.allclose(got, layer(x), rtol=1e-6, atol=1e-6)
