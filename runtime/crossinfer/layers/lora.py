"""A linear layer with per-token low-rank adapters: one base GEMM for the whole step, plus
each adapter's update for the tokens of its requests (multi-LoRA serving, punica's shape).

Every adapter resident on the device has a slot; a layer holds all slots' weights stacked,
``lora_a [max_loras, segments * max_rank, in]`` and ``lora_b [max_loras, out, segments *
max_rank]``, with the adapter's scale folded into ``lora_b``. A fused layer (q/k/v, gate/up)
is one low-rank update whose ``lora_b`` is block-diagonal: segment ``s`` of the output reads
only columns ``s * max_rank ...`` of the shrunk input, so each segment gets its own adapter
matrices, and a segment the adapter does not target stays zero. Ranks below ``max_rank`` are
zero-padded, which adds nothing.

The step's token -> slot map (``LoRAMapping``) is set once per step on a ``LoRAState`` that all
the model's LoRA layers share, because the layers keep ``nn.Linear``'s call signature: the
model file, the tensor-parallel wrappers and a backend's layer swaps are unchanged. The base
layer is the child ``base``, so a backend that swaps linear layers (the CPU's oneDNN and int8
layers) swaps it as it swaps any other; a backend with its own kernel (BGMV / SGMV) replaces
``LoRALinear`` by type and reads ``token_slots``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Rows = slice | torch.Tensor  # a contiguous range of tokens, or their indices [n] (int64)


@dataclass(frozen=True)
class LoRAMapping:
    """Which adapter slot each token of a step reads."""

    token_slots: torch.Tensor  # [num_tokens] int64: a slot, or -1 for the base model
    groups: tuple[tuple[int, Rows], ...]  # (slot, its tokens) for each slot in the step


class LoRAState:
    """The current step's mapping, shared by every LoRA layer of one model (None: no
    adapter in the step, the layers are their base layers)."""

    def __init__(self) -> None:
        self.mapping: LoRAMapping | None = None


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    groups: tuple[tuple[int, Rows], ...],
) -> torch.Tensor:
    """``out[t] += lora_b[slot(t)] @ (lora_a[slot(t)] @ x[t])`` for every token of a group;
    in place, returns ``out``. The reference: one shrink and one expand GEMM per slot in the
    step (at most ``max_loras``), over that slot's tokens. x: [tokens, in], out: [tokens, out]."""
    for slot, rows in groups:
        # [n, in] @ [in, rank] -> [n, rank] @ [rank, out] -> [n, out]
        if isinstance(rows, slice):
            out[rows] += (x[rows] @ lora_a[slot].t()) @ lora_b[slot].t()
        else:
            delta = (x.index_select(0, rows) @ lora_a[slot].t()) @ lora_b[slot].t()
            out.index_add_(0, rows, delta)
    return out


class LoRALinear(nn.Module):
    """``base(x)`` plus the low-rank update of each token's adapter slot."""

    lora_a: torch.Tensor  # [max_loras, segments * max_rank, in]
    lora_b: torch.Tensor  # [max_loras, out, segments * max_rank], scale applied

    def __init__(
        self,
        base: nn.Linear,
        segments: tuple[int, ...],
        max_loras: int,
        max_rank: int,
        state: LoRAState,
    ) -> None:
        super().__init__()
        self.base: nn.Module = base  # a backend may swap it for its own linear
        self.in_features = base.in_features
        self.out_features = base.out_features
        if sum(segments) != self.out_features:
            raise ValueError(f"segments {segments} do not add up to {self.out_features} outputs")
        self.segments = segments
        self.max_rank = max_rank
        self.state = state
        weight = base.weight
        ranks = len(segments) * max_rank
        shape_a, shape_b = (max_loras, ranks, self.in_features), (max_loras, sum(segments), ranks)
        self.register_buffer(
            "lora_a", torch.zeros(shape_a, dtype=weight.dtype, device=weight.device)
        )
        self.register_buffer(
            "lora_b", torch.zeros(shape_b, dtype=weight.dtype, device=weight.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mapping = self.state.mapping
        if mapping is None or not mapping.groups:
            return out
        return add_lora(out, x, self.lora_a, self.lora_b, mapping.groups)

    def set_slot(
        self, slot: int, weights: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]
    ) -> None:
        """Write one adapter into ``slot``: per segment (A [r, in], B [segment, r] with the
        scale applied) or None where it has no update; everything else becomes zero."""
        if len(weights) != len(self.segments):
            raise ValueError(f"{len(weights)} segment weights for {len(self.segments)} segments")
        a, b = self.lora_a[slot], self.lora_b[slot]
        with torch.no_grad():
            a.zero_()
            b.zero_()
            start = 0
            for index, (size, pair) in enumerate(zip(self.segments, weights, strict=True)):
                if pair is not None:
                    seg_a, seg_b = pair
                    rank = seg_a.shape[0]
                    column = index * self.max_rank
                    a[column : column + rank].copy_(seg_a)
                    b[start : start + size, column : column + rank].copy_(seg_b)
                start += size
