"""Tensor-parallel layers: a linear split by output columns or by input rows, and a
vocabulary split of the embedding and the LM head, reducing through the backend's
``Communicator``.

At tensor-parallel size 1 the builders return plain ``nn.Linear`` / ``nn.Embedding``: no
wrapper, no communicator call, the same parameter names. Above it each wrapper holds a plain
``inner`` module of its rank's shard (so a backend's ``prepare_model`` can swap it like any
linear) and does the collective around it:

- column-parallel needs no wrapper: a plain linear of this rank's output columns (the model
  splits fused q/k/v and gate/up per segment), no communication;
- row-parallel: this rank's input rows, then an all-reduce of the partial sums; the bias
  lives on rank 0 only, so it is added once;
- vocab-parallel embedding: this rank's vocabulary rows; ids outside them look up zeros, and
  an all-reduce assembles the rows;
- vocab-parallel LM head: this rank's vocabulary rows; an all-gather assembles the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from crossinfer.distributed.tensor_parallel import TensorParallel


class RowParallelLinear(nn.Module):
    """This rank's input rows of a linear; the partial outputs are summed over the ranks."""

    def __init__(self, local_in: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.inner = nn.Linear(local_in, out_features, bias=bias and tp.rank == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.inner(x))


def row_linear(local_in: int, out_features: int, bias: bool, tp: TensorParallel) -> nn.Module:
    if tp.size == 1:
        return nn.Linear(local_in, out_features, bias=bias)
    return RowParallelLinear(local_in, out_features, bias, tp)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding table; the whole lookup after an all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.start, local = tp.vocab_shard(vocab_size)
        self.inner = nn.Embedding(local, hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.inner.num_embeddings)
        rows = self.inner(local.masked_fill(outside, 0))
        return self.tp.all_reduce(rows.masked_fill(outside[:, None], 0))


def vocab_embedding(vocab_size: int, hidden_size: int, tp: TensorParallel) -> nn.Module:
    if tp.size == 1:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


class ParallelLMHead(nn.Module):
    """This rank's vocabulary rows of the output head; the logits gathered over the ranks."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        _, local = tp.vocab_shard(vocab_size)
        self.inner = nn.Linear(hidden_size, local, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather(self.inner(hidden), dim=-1)
        return logits[..., : self.vocab_size]  # the last rank's padding rows


def lm_head(hidden_size: int, vocab_size: int, tp: TensorParallel) -> nn.Module:
    if tp.size == 1:
        return nn.Linear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(hidden_size, vocab_size, tp)


def inner(module: nn.Module) -> nn.Module:
    """The plain layer: ``module`` itself, or a parallel wrapper's shard."""
    shard: nn.Module = getattr(module, "inner", module)
    return shard
