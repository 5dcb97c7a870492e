"""The batched LoRA update against a per-token loop, a fused layer's segments, and the device
slots' least-recently-used placement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crossinfer.layers.lora import LoRALinear, LoRAMapping, LoRAState, add_lora
from crossinfer.lora.slots import SlotTable


def test_batched_update_equals_a_per_token_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, fan_in, fan_out, slots, rank = 11, 12, 10, 3, 4
    x = torch.randn(tokens, fan_in, generator=gen)
    a = torch.randn(slots, rank, fan_in, generator=gen)
    b = torch.randn(slots, fan_out, rank, generator=gen)
    token_slots = [2, 2, 2, -1, 0, 0, 2, -1, 1, 0, 2]
    groups = (
        (2, torch.tensor([0, 1, 2, 6, 10])),  # scattered: gathered by index
        (0, torch.tensor([4, 5, 9])),
        (1, slice(8, 9)),  # one contiguous range
    )
    base = torch.randn(tokens, fan_out, generator=gen)
    got = add_lora(base.clone(), x, a, b, groups)
    want = base.clone()
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            want[t] += b[slot] @ (a[slot] @ x[t])
    torch.testing.assert_close(got, want)
    assert torch.equal(got[3], base[3]) and torch.equal(got[7], base[7])  # base tokens untouched


def test_a_fused_layer_gives_each_segment_its_own_update() -> None:
    gen = torch.Generator().manual_seed(1)
    base = nn.Linear(8, 6 + 3 + 3, bias=False)
    state = LoRAState()
    layer = LoRALinear(base, (6, 3, 3), max_loras=2, max_rank=4, state=state)
    a_q, b_q = torch.randn(2, 8, generator=gen), torch.randn(6, 2, generator=gen)
    a_v, b_v = torch.randn(3, 8, generator=gen), torch.randn(3, 3, generator=gen)
    layer.set_slot(1, ((a_q, b_q), None, (a_v, b_v)))  # k is not targeted
    x = torch.randn(3, 8, generator=gen)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # no mapping: the base layer alone
        state.mapping = LoRAMapping(torch.tensor([1, -1, 1]), ((1, torch.tensor([0, 2])),))
        got = layer(x)
        want = base(x)
    for t in (0, 2):
        want[t, :6] += b_q @ (a_q @ x[t])
        want[t, 9:] += b_v @ (a_v @ x[t])
    torch.testing.assert_close(got, want)


def test_slots_are_reused_least_recently_used_first() -> None:
    table = SlotTable(2)
    assert table.assign([7, 8]) == ({7: 0, 8: 1}, [(0, 7), (1, 8)])
    assert table.assign([8]) == ({8: 1}, [])  # resident: nothing to write; 7 is now oldest
    assert table.assign([9, 8]) == ({9: 0, 8: 1}, [(0, 9)])  # 7 evicted, 8 kept
    assert table.assign([7, 9]) == ({7: 1, 9: 0}, [(1, 7)])  # 8 was least recently used
    assert table.resident == [9, 7]
    with pytest.raises(ValueError, match="a step holds 3 adapters; max_loras is 2"):
        table.assign([1, 2, 3])
