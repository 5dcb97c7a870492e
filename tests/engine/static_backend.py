"""A test-only compiled-graph backend: the CPU as a static-shape device.

It declares buckets (``StaticShapes``), updates its cache functionally, attends with the
reference static-shape ops of crossinfer_xla, and runs the model's forward under
``torch.compile(fullgraph=True, dynamic=False)`` with a counting compiler, so every new shape
is a counted compile and any graph break is an error: what a TPU or Trainium backend would go
through, on this CPU, at no install cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from crossinfer.backend import (
    AttentionBatch,
    Backend,
    Capabilities,
    Communicator,
    EngineLimits,
    KVCacheSpec,
    MemoryInfo,
    Probe,
    StaticShapes,
)
from crossinfer.distributed.communicator import TorchDistributedCommunicator
from crossinfer_xla import static_ops
from crossinfer_xla.buckets import doubling
from crossinfer_xla.static_ops import SPLIT


class StaticCpuBackend(Backend):
    """The CPU, compiled per shape; see the module docstring."""

    name = "static-cpu"

    def __init__(
        self, split_prefill_decode: bool = False, widths: int = 2, decode_buckets: bool = False
    ) -> None:
        self.split = split_prefill_decode
        self.decode_buckets = decode_buckets
        self.num_widths = widths
        self.graphs = 0
        self.compile_cache_dir: str | None = None
        self.steps: list[str] = []  # "begin" / "end", to check the hooks' order

    def probe(self) -> Probe:
        return Probe(True, devices=("cpu (static shapes under torch.compile)",))

    def capabilities(self) -> Capabilities:
        return Capabilities(
            dtypes=(torch.float32,),
            kv_cache_dtypes=(torch.float32,),
            block_sizes=(4, 8, 16),
            head_sizes=(16, 32, 64, 128),
            default_block_size=8,
            default_kv_cache_bytes=4 << 20,
            kv_update="functional",
        )

    def static_shapes(self, limits: EngineLimits) -> StaticShapes:
        width = limits.max_blocks_per_seq
        widths = (width,) if self.num_widths == 1 else (max(1, width // 2), width)
        return StaticShapes(
            token_buckets=doubling(8, limits.max_num_batched_tokens),
            seq_buckets=doubling(2, limits.max_num_seqs),
            block_table_widths=tuple(sorted(set(widths))),
            decode_buckets=doubling(1, limits.max_num_seqs) if self.decode_buckets else None,
            pad_block=0,
            decode_first=True,
            split_prefill_decode=self.split,
        )

    def device(self) -> torch.device:
        return torch.device("cpu")

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(8 << 30, 8 << 30)

    def allocate_kv_cache(self, spec: KVCacheSpec, num_blocks: int) -> list[torch.Tensor]:
        shape = SPLIT.shape(spec, num_blocks)
        return [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        static_ops.copy_blocks(SPLIT, kv_caches, src_to_dst)

    def read_kv(
        self, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return static_ops.read_kv(SPLIT, kv_cache, slots, kv_cache.shape[-1])

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        return static_ops.write_kv(SPLIT, key, value, kv_cache, slot_mapping, in_place=False)

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float
    ) -> torch.Tensor:
        return static_ops.attention(SPLIT, query, kv_cache, batch, scale)

    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        return TorchDistributedCommunicator(rank, world_size, init_method, pg_backend="gloo")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        def counting(graph: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
            self.graphs += 1
            return graph.forward  # run the captured graph as it is: a shape checker

        # One graph per bucket is the point: allow many, and never fall back to eager.
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        model.forward = torch.compile(  # type: ignore[method-assign]
            model.forward, fullgraph=True, dynamic=False, backend=counting
        )
        return model

    def begin_step(self) -> None:
        self.steps.append("begin")

    def end_step(self) -> None:
        self.steps.append("end")

    def set_compile_cache_dir(self, path: str) -> None:
        self.compile_cache_dir = path
        os.makedirs(path, exist_ok=True)

    def compiled_graph_count(self) -> int:
        return self.graphs
