"""Drive a model through hand-made steps over a paged cache, for tests that compare logits.

Each step lists (sequence, num_computed_before, num_new): the model sees the new tokens of every
sequence in one ragged batch; the logits of every new token are returned, keyed by
(sequence, position).
"""

from __future__ import annotations

import torch

from crossinfer.backend import Backend, KVCacheSpec
from crossinfer.engine.batch import build_attention_batch
from crossinfer.models.llama import LlamaForCausalLM

Step = list[tuple[str, int, int]]


def run_steps(
    model: LlamaForCausalLM,
    backend: Backend,
    sequences: dict[str, list[int]],
    steps: list[Step],
    block_size: int = 4,
) -> dict[tuple[str, int], torch.Tensor]:
    args = model.args
    spec = KVCacheSpec(args.num_layers, args.num_kv_heads, args.head_dim, block_size, model.dtype)
    blocks_per_seq = {name: -(-len(ids) // block_size) for name, ids in sequences.items()}
    num_blocks = sum(blocks_per_seq.values()) + 1
    caches = backend.allocate_kv_cache(spec, num_blocks)
    # Hand out block ids in reverse so no sequence's blocks are contiguous or start at 0.
    free = list(range(num_blocks - 1, 0, -1))
    tables = {name: [free.pop() for _ in range(n)][::-1] for name, n in blocks_per_seq.items()}

    logits: dict[tuple[str, int], torch.Tensor] = {}
    for step in steps:
        ids: list[int] = []
        positions: list[int] = []
        for name, done, new in step:
            ids += sequences[name][done : done + new]
            positions += list(range(done, done + new))
        batch = build_attention_batch(
            query_lens=[new for _, _, new in step],
            seq_lens=[done + new for _, done, new in step],
            block_tables=[tables[name] for name, _, _ in step],
            block_size=block_size,
            device=backend.device(),
        )
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), torch.tensor(positions), caches, batch)
            out = model.compute_logits(hidden)
        row = 0
        for name, done, new in step:
            for pos in range(done, done + new):
                logits[(name, pos)] = out[row]
                row += 1
    return logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())
