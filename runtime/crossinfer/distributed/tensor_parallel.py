"""A rank's place in its tensor-parallel group, and how each weight is split over the group.

One ``TensorParallel`` per model: its rank, the group's size and the backend's
``Communicator`` (None at size 1, where nothing communicates). The split of attention heads:
query heads evenly; KV heads evenly when there are at least as many as ranks, else each KV
head replicated on ``size / num_kv_heads`` consecutive ranks (as vLLM does), so every rank
holds the KV head its query heads read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crossinfer.backend import Communicator


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    communicator: Communicator | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1 or self.communicator is None:
            return x
        return self.communicator.all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1 or self.communicator is None:
            return x
        return self.communicator.all_gather(x.contiguous(), dim % x.dim())

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's even share of ``total``."""
        if total % self.size:
            raise ValueError(
                f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}"
            )
        length = total // self.size
        return self.rank * length, length

    def vocab_shard(self, vocab_size: int) -> tuple[int, int]:
        """(first id, rows) of this rank's share of the vocabulary, ``ceil(vocab / size)`` rows
        each (the last rank's past the vocabulary are padding)."""
        rows = -(-vocab_size // self.size)
        return self.rank * rows, rows

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, KV heads) this rank holds."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads, "the number of KV heads")
        if self.size % num_kv_heads:
            raise ValueError(
                f"the tensor-parallel size {self.size} is neither a divisor nor a multiple of "
                f"the {num_kv_heads} KV heads"
            )
        return self.rank * num_kv_heads // self.size, 1


def check_sizes(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> str | None:
    """Why a model with these heads and MLP columns cannot be split ``size`` ways; None when
    it can."""
    if size < 1:
        return f"the tensor-parallel size must be at least 1, not {size}"
    if num_heads % size:
        return (
            f"the model's {num_heads} attention heads are not divisible by the "
            f"tensor-parallel size {size}"
        )
    if num_kv_heads % size and size % num_kv_heads:
        return (
            f"the tensor-parallel size {size} is neither a divisor nor a multiple of the "
            f"model's {num_kv_heads} KV heads"
        )
    if intermediate_size % size:
        return f"the MLP's intermediate size {intermediate_size} is not divisible by {size}"
    return None
