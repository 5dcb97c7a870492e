"""The CPU backend's kernels against a dense, unpaged attention reference."""

from __future__ import annotations

import itertools
import socket

import pytest
import torch
import torch.multiprocessing as mp

from crossinfer.backend import KVCacheSpec
from crossinfer_cpu import CpuBackend, native
from tests.backends.paged_case import assert_copy_blocks_copies_every_layer, paged_case

# (context before this step, new tokens): a full prefill, a prefill after a cached prefix,
# decodes, and a decode whose last block is partly filled (added per block size).
SHAPES = [(0, 19), (37, 6), (50, 1), (1, 1)]


@pytest.mark.parametrize(
    "block_size,group,head_size",
    list(itertools.product([1, 16, 32], [1, 3, 4], [64, 80, 128])),
)
def test_paged_attention_matches_dense(
    block_size: int, group: int, head_size: int, cpu_kernels: str
) -> None:
    backend = CpuBackend()
    shapes = [*SHAPES, (block_size * 2, 1)]
    seed = block_size * 100 + group * 10 + head_size
    case = paged_case(backend, shapes, block_size, group, head_size, seed=seed)
    out = backend.attention(case.query, case.cache, case.batch, case.scale)
    planned = backend._planned
    assert planned is not None
    decode_group = next(g for g in planned[1].groups if g.rows.shape[1] == 1)
    assert (decode_group.native is not None) == (cpu_kernels == "native")
    assert out.shape == (sum(n for _, n in shapes), 2 * group, head_size)
    assert torch.allclose(out.double(), case.expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "group,head_size,block_size",
    [(1, 256, 16), (2, 256, 16), (4, 64, 8), (8, 32, 16), (5, 128, 128), (6, 48, 16), (8, 64, 1)],
)
def test_decode_at_the_edges_of_the_tiled_kernel(
    group: int, head_size: int, block_size: int, kv_dtype: torch.dtype, cpu_kernels: str
) -> None:
    """The native kernel walks a sequence in tiles of 16 tokens, up to 4 query rows of a KV
    head at a time (as many as keep 16 vectors of value sums in registers), and takes head
    sizes up to 128: contexts at and around tile edges, query heads split into several row
    sets (5 x 128 into 2 + 2 + 1, 6 x 48 into 4 + 2, 8 x 64 into 4 + 4), head size 256 (the
    two-pass loop) and bf16 keys (widened once a tile for several rows) still match."""
    backend = CpuBackend()
    shapes = [(15, 1), (16, 1), (31, 1), (0, 1), (299, 1)]
    case = paged_case(backend, shapes, block_size, group, head_size, seed=group, kv_dtype=kv_dtype)
    out = backend.attention(case.query, case.cache, case.batch, case.scale)
    assert torch.allclose(out.double(), case.expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "group,head_size,block_size", [(1, 64, 16), (3, 64, 1), (8, 128, 32), (2, 256, 128), (5, 48, 8)]
)
def test_prefill_at_the_edges_of_the_native_kernel(
    group: int, head_size: int, block_size: int, kv_dtype: torch.dtype, cpu_kernels: str
) -> None:
    """The native prefill kernel takes 16 query tokens a task and keys in tiles of 16:
    prompts at and around those edges, a chunk after a long cached context, a single new
    token among prefills, 8 rows of scores at a time (group 5: 80 rows a task), head sizes
    up to 256, bf16 keys and values."""
    backend = CpuBackend()
    shapes = [(0, 16), (0, 17), (5, 33), (300, 40), (0, 2), (31, 1)]
    case = paged_case(
        backend, shapes, block_size, group, head_size, seed=head_size + group, kv_dtype=kv_dtype
    )
    out = backend.attention(case.query, case.cache, case.batch, case.scale)
    assert torch.allclose(out.double(), case.expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("group", [1, 3])
def test_many_decode_sequences_match_dense(group: int, cpu_kernels: str) -> None:
    """Enough sequences that the native kernel gives each thread whole sequences."""
    backend = CpuBackend()
    shapes = [(n * 7 % 61, 1) for n in range(40)]
    case = paged_case(backend, shapes, 16, group, 64, seed=group)
    out = backend.attention(case.query, case.cache, case.batch, case.scale)
    assert torch.allclose(out.double(), case.expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shapes", [SHAPES, [(n * 7 % 61, 1) for n in range(40)]])
def test_a_bf16_cache_under_fp32_activations(shapes: list, cpu_kernels: str) -> None:
    """--kv-cache-dtype bfloat16: stored rounded, read back widened (the native decode kernel
    reads bf16 in place), fp32 arithmetic: the answer over the rounded keys, to fp32 accuracy."""
    backend = CpuBackend()
    case = paged_case(backend, shapes, 16, 3, 64, seed=9, kv_dtype=torch.bfloat16)
    assert case.cache.dtype == torch.bfloat16
    out = backend.attention(case.query, case.cache, case.batch, case.scale)
    planned = backend._planned
    assert planned is not None
    decode_group = next(g for g in planned[1].groups if g.rows.shape[1] == 1)
    assert (decode_group.native is not None) == (cpu_kernels == "native")
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), case.expected, atol=1e-5, rtol=1e-4)


def test_bf16_activations_run_the_pytorch_path() -> None:
    """bf16 tokens (the native kernels take fp32 ones) run the PyTorch path and still match."""
    backend = CpuBackend()
    case = paged_case(backend, [(40, 1), (3, 1)], 16, 3, 64, dtype=torch.bfloat16, seed=5)
    out = backend.attention(case.query, case.cache, case.batch, case.scale)
    assert torch.allclose(out.double(), case.expected, atol=2e-2, rtol=2e-2)


def test_native_kernel_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    native._load.cache_clear()
    try:
        assert native._load() == (None, f"{native.NATIVE_ENV}=0")
    finally:
        native._load.cache_clear()


def test_write_kv_touches_only_named_slots() -> None:
    backend = CpuBackend()
    spec = KVCacheSpec(1, 2, 64, 4, torch.float32)
    (cache,) = backend.allocate_kv_cache(spec, 3)
    cache.fill_(7.0)
    slots = torch.tensor([5, 6], dtype=torch.int64)
    key = torch.randn(2, 2, 64)
    backend.write_kv(key, -key, cache, slots)
    got_k, got_v = backend.read_kv(cache, slots)
    assert torch.equal(got_k, key) and torch.equal(got_v, -key)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[[5, 6]] = False
    assert bool((cache.view(2, 12, 2, 64)[:, untouched] == 7.0).all())


def test_copy_blocks_copies_keys_and_values_in_every_layer() -> None:
    assert_copy_blocks_copies_every_layer(CpuBackend())


def test_kv_cache_bytes_match_spec() -> None:
    spec = KVCacheSpec(
        num_layers=3, num_kv_heads=2, head_size=64, block_size=16, dtype=torch.bfloat16
    )
    caches = CpuBackend().allocate_kv_cache(spec, 5)
    total = sum(c.numel() * c.element_size() for c in caches)
    assert total == 5 * spec.bytes_per_block == 5 * 3 * 2 * 16 * 2 * 64 * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int, results: dict) -> None:
    comm = CpuBackend().communicator(rank, 2, f"tcp://127.0.0.1:{port}")
    try:
        reduced = comm.all_reduce(torch.tensor([1.0, 2.0]) * (rank + 1))
        gathered = comm.all_gather(torch.tensor([[rank]]), dim=1)
        sent = comm.broadcast(torch.tensor([rank + 5]), src=1)
        comm.barrier()
        results[rank] = (reduced.tolist(), gathered.tolist(), sent.tolist())
    finally:
        comm.close()


def test_gloo_communicator_world_size_two() -> None:
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(_free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank] == ([3.0, 6.0], [[0, 1]], [6])


def test_probe_and_memory_are_honest() -> None:
    backend = CpuBackend()
    probe = backend.probe()
    assert probe.available and probe.reason == "" and len(probe.devices) == 1
    mem = backend.memory_info()
    assert 0 < mem.free_bytes <= mem.total_bytes
