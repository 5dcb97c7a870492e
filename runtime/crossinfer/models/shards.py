"""Which part of each checkpoint tensor one tensor-parallel rank holds (Llama family).

Query heads, the MLP's intermediate columns and the vocabulary are split evenly; KV heads
too, or replicated when there are fewer than ranks (``TensorParallel.kv_heads``). A
row-parallel layer (``o_proj``, ``down_proj``) takes its input columns, and its bias only on
rank 0 (the all-reduce adds it once). Norms are whole on every rank. At size 1 every part is
the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crossinfer.distributed.tensor_parallel import TensorParallel

VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")  # split by vocabulary rows
Part = tuple[int, int, int]  # (dim, start, length) of a checkpoint tensor


@dataclass(frozen=True)
class RankShards:
    """This rank's ranges, in rows of the checkpoint tensors."""

    rank: int
    q: tuple[int, int]  # (first row, rows) of q_proj: heads x head_dim
    kv: tuple[int, int]  # of k_proj and v_proj
    mlp: tuple[int, int]  # of gate_proj and up_proj (columns of down_proj)
    vocab: tuple[int, int]  # of embed_tokens and lm_head (rows past the vocabulary: padding)

    @classmethod
    def build(
        cls,
        tp: TensorParallel,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        vocab_size: int,
    ) -> RankShards:
        q_start, q_heads = tp.split(num_heads, "the number of attention heads")
        kv_start, kv_heads = tp.kv_heads(num_kv_heads)
        return cls(
            rank=tp.rank,
            q=(q_start * head_dim, q_heads * head_dim),
            kv=(kv_start * head_dim, kv_heads * head_dim),
            mlp=tp.split(intermediate_size, "the MLP's intermediate size"),
            vocab=tp.vocab_shard(vocab_size),
        )

    def select(self, name: str, shape: Sequence[int]) -> Part | None:
        """Which part of checkpoint tensor ``name`` (of ``shape``) this rank holds, as
        (dim, start, length), or None when it holds none of it. Loaders read just that."""
        rows = {
            "self_attn.q_proj.": self.q,
            "self_attn.k_proj.": self.kv,
            "self_attn.v_proj.": self.kv,
            "mlp.gate_proj.": self.mlp,
            "mlp.up_proj.": self.mlp,
        }
        for marker, (start, length) in rows.items():
            if marker in name:
                return (0, start, length)
        for marker, (start, length) in (
            ("self_attn.o_proj.", self.q),
            ("mlp.down_proj.", self.mlp),
        ):
            if marker in name:
                if name.endswith(".bias"):
                    return (0, 0, shape[0]) if self.rank == 0 else None
                return (1, start, length)
        if name.endswith(VOCAB_TENSORS):
            start, length = self.vocab
            return (0, start, max(0, min(length, shape[0] - start)))
        return (0, 0, shape[0]) if shape else (0, 0, 0)


def narrow(tensor: torch.Tensor, part: Part) -> torch.Tensor:
    """``tensor``'s (dim, start, length) part, a view; a 0-d tensor is whole. For whole
    checkpoint tensors (``LlamaModel.load_weights(..., whole=True)``)."""
    if tensor.dim() == 0:
        return tensor
    dim, start, length = part
    return tensor.narrow(dim, start, length)
