"""Sentinels name the slots a KV write should not have touched, block by block."""

from __future__ import annotations

import pytest
import torch

from crossinfer.backend import KVCacheSpec
from crossinfer_conformance import sentinels
from crossinfer_conformance.outcome import CheckFailed
from crossinfer_cpu import CpuBackend


def test_slots_are_grouped_by_block_and_placed_next_to_the_writes() -> None:
    written = list(range(32, 48)) + list(range(80, 85))
    changed = list(range(48, 64)) + [85, 86, 130]
    assert sentinels.describe_slots(changed, written, 16) == (
        "block 3 slots 0-15 (all of it), right after written block 2; block 5 slots 5-6, in a "
        "block that was partly written; block 8 slot 2, not next to any written block"
    )


def test_a_stray_write_is_caught_and_a_clean_one_is_not() -> None:
    backend = CpuBackend()
    spec = KVCacheSpec(1, 2, 32, 4, torch.float32)
    (cache,) = backend.allocate_kv_cache(spec, 5)
    sentinels.fill(backend, cache, (20, 2, 32), torch.float32)
    slots = torch.tensor([4, 5, 6, 7, 13])
    keys = torch.randn(5, 2, 32)
    backend.write_kv(keys, -keys, cache, slots)
    every = torch.arange(20)
    stored = backend.read_kv(cache, every)
    sentinels.assert_untouched(*stored, slots.tolist(), 4, "write_kv")

    backend.write_kv(keys[:1], keys[:1], cache, torch.tensor([8]))  # one slot too far
    stored = backend.read_kv(cache, every)
    with pytest.raises(CheckFailed) as err:
        sentinels.assert_untouched(*stored, slots.tolist(), 4, "write_kv")
    assert str(err.value) == (
        "write_kv changed 1 slots it was not given: block 2 slot 0, right after written block 1"
    )
