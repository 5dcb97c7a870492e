"""The Triton kernels, run by Triton's interpreter on CPU tensors (emulated), against a dense
reference and the CPU backend."""

from __future__ import annotations

import pytest
import torch

from crossinfer.backend import KVCacheSpec
from crossinfer.engine.batch import build_attention_batch
from crossinfer_cuda import CudaBackend
from tests.backends.paged_case import assert_copy_blocks_copies_every_layer, paged_case

SHAPES = [(0, 19), (37, 6), (50, 1), (1, 1)]
"""(tokens already cached, new tokens): a prefill, a prefix chunk, decodes."""


@pytest.fixture
def backend(emulated_cuda: CudaBackend) -> CudaBackend:
    return emulated_cuda


def _normalised_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize(
    "block_size,group,head_size,dtype,tolerance",
    [
        (16, 1, 64, torch.float32, 1e-6),
        (1, 4, 64, torch.float32, 1e-6),
        (8, 3, 80, torch.float32, 1e-6),  # 6 query heads: tiles of 5 tokens x 3 heads
        (32, 2, 128, torch.float32, 1e-6),
        (16, 2, 64, torch.bfloat16, 1e-2),
        (16, 4, 64, torch.float16, 2e-3),
    ],
)
def test_attention_matches_dense(
    backend: CudaBackend,
    block_size: int,
    group: int,
    head_size: int,
    dtype: torch.dtype,
    tolerance: float,
) -> None:
    shapes = [*SHAPES, (block_size * 2, 1)]
    case = paged_case(backend, shapes, block_size, group, head_size, dtype, seed=block_size)
    out = backend.attention(case.query, case.cache, case.batch, case.scale)
    assert out.shape == case.query.shape and out.dtype == dtype
    assert _normalised_error(out, case.expected) < tolerance


def test_long_decodes_take_the_split_k_path_and_match(backend: CudaBackend) -> None:
    from crossinfer_triton import paged_attention as kernels

    case = paged_case(backend, [(600, 1), (300, 1), (5, 1)], 16, 4, 64, seed=3)
    splits = kernels.num_splits(case.batch, 2, backend.num_cores(), backend.tiles())
    assert splits > 1
    split = backend.attention(case.query, case.cache, case.batch, case.scale)
    assert _normalised_error(split, case.expected) < 1e-6
    # More slices than the short sequence has keys: its empty slices must weigh nothing.
    many = kernels.paged_attention(
        case.query, case.cache, case.batch, case.scale, backend.tiles(), splits=16
    )
    whole = kernels.paged_attention(
        case.query, case.cache, case.batch, case.scale, backend.tiles(), splits=1
    )
    assert torch.allclose(many, whole, atol=1e-6) and torch.allclose(split, whole, atol=1e-6)


def test_prefill_never_splits(backend: CudaBackend) -> None:
    from crossinfer_triton import paged_attention as kernels

    batch = build_attention_batch([5], [2000], [list(range(125))], 16, torch.device("cpu"))
    assert kernels.num_splits(batch, 1, 1000, backend.tiles()) == 1


def test_write_kv_reads_strided_keys_and_skips_negative_slots(backend: CudaBackend) -> None:
    (cache,) = backend.allocate_kv_cache(KVCacheSpec(1, 2, 64, 4, torch.float32), 3)
    cache.fill_(7.0)
    # Keys and values as the model passes them: views into one fused projection.
    fused = torch.randn(3, 6, 64)
    key, value = fused[:, 2:4], fused[:, 4:6]
    slots = torch.tensor([5, -1, 6], dtype=torch.int64)
    backend.write_kv(key, value, cache, slots)
    got_k, got_v = backend.read_kv(cache, torch.tensor([5, 6]))
    assert torch.equal(got_k, key[[0, 2]]) and torch.equal(got_v, value[[0, 2]])
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[[5, 6]] = False
    assert bool((cache.view(2, 12, 2, 64)[:, untouched] == 7.0).all())


def test_write_kv_casts_to_the_cache_dtype(backend: CudaBackend) -> None:
    (cache,) = backend.allocate_kv_cache(KVCacheSpec(1, 1, 32, 2, torch.bfloat16), 2)
    key = torch.full((1, 1, 32), 1.5)
    backend.write_kv(key, -key, cache, torch.tensor([3]))
    assert cache.dtype == torch.bfloat16
    assert bool((cache[0, 1, 1] == 1.5).all()) and bool((cache[1, 1, 1] == -1.5).all())


def test_copy_blocks_copies_keys_and_values_in_every_layer(backend: CudaBackend) -> None:
    assert_copy_blocks_copies_every_layer(backend)
