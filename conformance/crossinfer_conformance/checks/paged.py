"""Shared by the kernel checks: random block layouts, reading a backend's opaque cache back
through ``read_kv``, and the CPU reference's attention over given keys and values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crossinfer.backend import Backend, KVCacheSpec
from crossinfer.engine.batch import build_attention_batch
from crossinfer_conformance.outcome import NotSupported
from crossinfer_cpu import CpuBackend

HOST = torch.device("cpu")


@dataclass(frozen=True)
class Layout:
    """Which blocks hold which sequence: shuffled, with spare blocks nobody owns."""

    block_size: int
    num_blocks: int
    tables: tuple[tuple[int, ...], ...]
    seq_lens: tuple[int, ...]

    def slots(self, seq: int, positions: Sequence[int]) -> list[int]:
        """Cache slots of the given token positions of sequence ``seq``."""
        table, bs = self.tables[seq], self.block_size
        return [table[p // bs] * bs + p % bs for p in positions]

    def context_slots(self) -> torch.Tensor:
        """[sum(seq_lens)] int64: every context token's slot, sequence by sequence."""
        slots = [s for i, n in enumerate(self.seq_lens) for s in self.slots(i, range(n))]
        return torch.tensor(slots, dtype=torch.int64)


def random_layout(
    seq_lens: Sequence[int], block_size: int, gen: torch.Generator, spare: int = 2
) -> Layout:
    """Give each sequence the blocks it needs, drawn at random from a pool with spares."""
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(tuple(order[at : at + n]))
        at += n
    return Layout(block_size, num_blocks, tuple(tables), tuple(seq_lens))


def read_back(
    backend: Backend, cache: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at ``slots``, on the host; read_kv is optional in the contract."""
    try:
        keys, values = backend.read_kv(cache, slots.to(backend.device()))
    except NotImplementedError as exc:
        raise NotSupported(
            f"the backend does not implement the optional read_kv ({exc}), so the suite "
            "cannot see what its cache holds"
        ) from exc
    backend.synchronize()
    return keys.to(HOST), values.to(HOST)


def reference_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: Layout,
    query_lens: Sequence[int],
) -> torch.Tensor:
    """The CPU backend's attention in fp32 over ``keys``/``values`` laid out as ``layout``
    (in :meth:`Layout.context_slots` order); query rows are each sequence's last tokens."""
    reference = CpuBackend()
    num_kv_heads, head_size = keys.shape[1:]
    spec = KVCacheSpec(1, num_kv_heads, head_size, layout.block_size, torch.float32)
    (cache,) = reference.allocate_kv_cache(spec, layout.num_blocks)
    reference.write_kv(keys.float(), values.float(), cache, layout.context_slots())
    tables = [list(t) for t in layout.tables]
    batch = build_attention_batch(query_lens, layout.seq_lens, tables, layout.block_size, HOST)
    return reference.attention(query.to(HOST).float(), cache, batch, head_size**-0.5)
