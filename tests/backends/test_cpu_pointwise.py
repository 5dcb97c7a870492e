"""The CPU backend's native per-token layers against the reference layers they replace."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from transformers import LlamaConfig

from crossinfer.backend import KVCacheSpec
from crossinfer.layers.activation import SiluAndMul
from crossinfer.layers.norm import RMSNorm
from crossinfer.layers.rotary import RotaryEmbedding, Rotate
from crossinfer.models.llama import LlamaForCausalLM
from crossinfer_cpu import CpuBackend, attention, native
from crossinfer_cpu.linear import CpuLinear
from crossinfer_cpu.pointwise import CpuRMSNorm, CpuRotate, CpuSiluAndMul
from crossinfer_cpu.prepare import prepare_layers

# One row and 7 rows of 576 run on one thread; 32 and 300 rows are split over the threads.
ROWS = [1, 7, 32, 300]


@pytest.fixture(scope="module")
def lib():
    lib = native.library()
    if lib is None:
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    return lib


CAN_BUILD = sys.platform == "linux" and shutil.which("cc") is not None
TURNED_OFF = os.environ.get(native.NATIVE_ENV) == "0"


@pytest.mark.skipif(
    not CAN_BUILD or TURNED_OFF,
    reason="the native kernels are built on Linux with a C compiler, when not turned off",
)
def test_the_native_kernels_build_where_they_can() -> None:
    """Every kernel test below skips when the build fails: this one says why instead."""
    assert native.library() is not None, native.why_unavailable()


def _norm(hidden: int, seed: int) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_matches_reference(lib, rows: int) -> None:
    reference = _norm(576, rows)
    native_norm = CpuRMSNorm(reference, lib)
    wide = torch.randn(rows, 700) * 3
    x = wide[:, 50:626]  # rows with a stride wider than the row
    torch.testing.assert_close(native_norm(x), reference(x))


@pytest.mark.parametrize("rows", ROWS)
def test_add_and_norm_matches_reference_in_place(lib, rows: int) -> None:
    reference = _norm(576, rows)
    native_norm = CpuRMSNorm(reference, lib)
    x, residual = torch.randn(rows, 576), torch.randn(rows, 576) * 2
    want_normed, want_sum = reference.add_and_norm(x.clone(), residual.clone())
    normed, total = native_norm.add_and_norm(x, residual)
    assert normed.data_ptr() == x.data_ptr() and total.data_ptr() == residual.data_ptr()
    assert torch.equal(total, want_sum)  # one fp32 add per element either way
    torch.testing.assert_close(normed, want_normed)


def test_norm_falls_back_for_other_dtypes(lib) -> None:
    reference = _norm(64, 0).to(torch.bfloat16)
    native_norm = CpuRMSNorm(reference, lib)
    x, residual = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(5, 64).bfloat16()
    assert torch.equal(native_norm(x), reference(x))
    got = native_norm.add_and_norm(x.clone(), residual.clone())
    want = reference.add_and_norm(x.clone(), residual.clone())
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _rope(tokens: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = LlamaConfig(hidden_size=4 * head_size, num_attention_heads=4, rope_theta=10000.0)
    rotary = RotaryEmbedding(config, head_size, 4096, torch.float32, torch.device("cpu"))
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(tokens))
    return rotary.lookup(positions)


@pytest.mark.parametrize("tokens", [1, 32, 300])
@pytest.mark.parametrize("head_size", [64, 80])
def test_rotary_matches_reference_in_place(lib, tokens: int, head_size: int) -> None:
    # q heads then k heads rotate; the v heads after them must stay as they are
    qkv = torch.randn(tokens, 9 + 2 * 3, head_size)
    values = qkv[:, 12:].clone()
    cos, sin = _rope(tokens, head_size)
    want = Rotate()(qkv[:, :12], cos, sin)
    got = CpuRotate(lib)(qkv[:, :12], cos, sin)
    assert got.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(got, want)
    assert torch.equal(qkv[:, 12:], values)


def test_rotary_falls_back_when_heads_are_not_together(lib) -> None:
    x = torch.randn(6, 64, 4).transpose(1, 2)  # [tokens, heads, head_size], head axis strided
    cos, sin = _rope(6, 64)
    assert torch.equal(CpuRotate(lib)(x, cos, sin), Rotate()(x, cos, sin))


@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_matches_reference(lib, rows: int) -> None:
    x = (torch.randn(rows, 8 + 2 * 1536) * 4)[:, 8:]  # rows with a wider stride
    want = SiluAndMul()(x.clone())
    got = CpuSiluAndMul(lib)(x)
    assert got.is_contiguous() and got.shape == (rows, 1536)
    torch.testing.assert_close(got, want)


def test_silu_and_mul_falls_back_for_bf16(lib) -> None:
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert torch.equal(CpuSiluAndMul(lib)(x.clone()), SiluAndMul()(x.clone()))


@pytest.mark.parametrize("tokens", [3, 300])
def test_write_kv_from_a_fused_projection(cpu_kernels: str, tokens: int) -> None:
    """Keys and values as the model passes them: views into the q/k/v projection's output."""
    backend = CpuBackend()
    (cache,) = backend.allocate_kv_cache(KVCacheSpec(1, 2, 64, 16, torch.float32), 40)
    cache.fill_(7.0)
    qkv = torch.randn(tokens, 6 + 2 + 2, 64)
    key, value = qkv[:, 6:8], qkv[:, 8:]
    slots = torch.randperm(40 * 16, generator=torch.Generator().manual_seed(tokens))[:tokens]
    assert attention._native_layout(cache, key, value)  # so native whenever it is built
    backend.write_kv(key, value, cache, slots)
    got_k, got_v = backend.read_kv(cache, slots)
    assert torch.equal(got_k, key) and torch.equal(got_v, value)
    untouched = torch.ones(40 * 16, dtype=torch.bool)
    untouched[slots] = False
    assert bool((cache.view(2, -1, 2, 64)[:, untouched] == 7.0).all())


def test_native_bf16_write_rounds_as_torch_does(lib) -> None:
    """Round to nearest even, ties included; infinities, NaN and subnormals kept."""
    backend = CpuBackend()
    (cache,) = backend.allocate_kv_cache(KVCacheSpec(1, 1, 64, 4, torch.bfloat16), 4)
    key = torch.randn(5, 1, 64) * torch.logspace(-40, 38, 64)
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x00008000], dtype=torch.int32)
    key[0, 0, :4] = bits.view(torch.float32)  # ties to even (down, up), above a tie, subnormal
    key[1, 0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
    value = -key
    assert attention._native_layout(cache, key, value)
    slots = torch.tensor([3, 0, 9, 15, 6])
    backend.write_kv(key, value, cache, slots)
    for got, want in zip(backend.read_kv(cache, slots), (key, value), strict=True):
        want = want.to(torch.bfloat16)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_native_write_kv_ignores_slots_outside_the_cache(lib) -> None:
    backend = CpuBackend()
    (cache,) = backend.allocate_kv_cache(KVCacheSpec(1, 1, 64, 4, torch.float32), 2)
    key = torch.randn(3, 1, 64)
    backend.write_kv(key, -key, cache, torch.tensor([-1, 3, 8]))
    keys, values = cache.view(2, 8, 64)
    assert torch.equal(keys[3], key[1, 0]) and torch.equal(values[3], -key[1, 0])
    assert int((keys != 0).any(dim=1).sum()) == 1 and int((values != 0).any(dim=1).sum()) == 1


def _tiny_llama(backend: CpuBackend) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config, backend, torch.float32)


def test_prepare_swaps_every_layer_kind(lib) -> None:
    model = _tiny_llama(CpuBackend())
    final_norm_weight = model.norm.weight
    prepare_layers(model)
    layer = model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj, CpuLinear)
    assert isinstance(layer.self_attn.rotate, CpuRotate)
    assert isinstance(layer.mlp.act, CpuSiluAndMul)
    assert isinstance(layer.input_layernorm, CpuRMSNorm) and isinstance(model.norm, CpuRMSNorm)
    assert model.norm.weight is final_norm_weight  # shared, not copied


def test_prepare_without_native_kernels_swaps_linears_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native, "library", lambda: None)
    model = prepare_layers(_tiny_llama(CpuBackend()))
    layer = model.layers[0]
    assert isinstance(layer.mlp.down_proj, CpuLinear)
    assert type(layer.self_attn.rotate) is Rotate and type(layer.mlp.act) is SiluAndMul
    assert type(layer.post_attention_layernorm) is RMSNorm
