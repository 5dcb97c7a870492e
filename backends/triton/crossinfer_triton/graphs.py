"""Decode steps replayed from captured device graphs (CUDA graphs; HIP graphs on ROCm; XPU
graphs where a vendor turns them on).

A decode step launches a few hundred small kernels whose launch cost, at small batch, rivals
their run time. :class:`GraphedDecode` wraps the model (gpt-fast style: a transform, the model
is unchanged): a step where every sequence brings one token is padded up to the next captured
batch size and replayed from a graph whose inputs live in static buffers; every other step
(prefill, mixed, larger batches) runs eagerly.

Graphs are captured lazily, the first time a padded size is needed, because the KV cache they
read is allocated after ``prepare_model``. Padded rows write nothing (slot -1, which write_kv
skips), attend to one token of a real block, and are dropped from the output.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from crossinfer.backend import AttentionBatch

DECODE_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
"""Batch sizes captured on demand; larger decode batches run eagerly."""

Capture = Callable[[Callable[[], torch.Tensor]], tuple[torch.Tensor, Callable[[], None]]]
"""Records ``fn`` once; returns its output buffer and a function that replays it."""


def device_graph_capture(device_module: ModuleType, graph_type: type) -> Capture:
    """Capture with ``graph_type`` (``torch.cuda.CUDAGraph``, ``torch.xpu.XPUGraph``) through
    its device module's streams and ``graph`` context, all graphs sharing one memory pool.
    The vendor names both; nothing here is tied to one vendor."""
    pool: list[Any] = []  # the first graph's pool handle

    def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        side = device_module.Stream()
        side.wait_stream(device_module.current_stream())
        with device_module.stream(side):  # warm up: autotuning and allocations happen here
            for _ in range(2):
                fn()
        device_module.current_stream().wait_stream(side)
        graph = graph_type()
        with device_module.graph(graph, pool=pool[0] if pool else None):
            out = fn()
        if not pool:
            pool.append(graph.pool())
        return out, graph.replay

    return capture


@dataclass
class _StaticStep:
    """The input buffers of one captured size, the graph's output and its replay."""

    input_ids: torch.Tensor  # [size] int64
    positions: torch.Tensor  # [size] int64
    batch: AttentionBatch  # its tensors are the static buffers
    kv_caches: list[torch.Tensor]
    output: torch.Tensor  # [size, hidden]
    replay: Callable[[], None]


class GraphedDecode(torch.nn.Module):
    """``model`` with its decode steps replayed from graphs; see the module docstring."""

    def __init__(
        self, model: torch.nn.Module, capture: Capture, sizes: tuple[int, ...] = DECODE_SIZES
    ) -> None:
        super().__init__()
        self.model: Any = model  # a crossinfer Llama-family model: args, rotary, compute_logits
        self.capture = capture
        self.sizes = tuple(sorted(sizes))
        self._steps: dict[int, _StaticStep] = {}

    @property
    def args(self) -> object:
        return self.model.args

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        n = batch.num_seqs
        if batch.max_query_len != 1 or batch.num_tokens != n or n > self.sizes[-1]:
            return self.model(input_ids, positions, kv_caches, batch)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        step = self._steps.get(size)
        if step is None or step.kv_caches is not kv_caches:
            step = self._steps[size] = self._capture(size, kv_caches, input_ids.device)
        self._fill(step, input_ids, positions, batch)
        step.replay()
        return step.output[:n]

    def _capture(
        self, size: int, kv_caches: list[torch.Tensor], device: torch.device
    ) -> _StaticStep:
        block_size = kv_caches[0].shape[2]
        max_positions = int(self.model.rotary.cos.shape[0])
        width = -(-max_positions // block_size)

        def buffer(fill: int, *shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        batch = AttentionBatch(
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=device),
            seq_lens=buffer(1, size),
            block_table=buffer(0, size, width),
            slot_mapping=buffer(-1, size, dtype=torch.int64),
            max_query_len=1,
            # Host-side planning (split-K) must not depend on the step: plan for the longest.
            max_seq_len=max_positions,
            query_lens_cpu=(1,) * size,
            seq_lens_cpu=(max_positions,) * size,
        )
        input_ids = buffer(0, size, dtype=torch.int64)
        positions = buffer(0, size, dtype=torch.int64)
        output, replay = self.capture(lambda: self.model(input_ids, positions, kv_caches, batch))
        return _StaticStep(input_ids, positions, batch, kv_caches, output, replay)

    @staticmethod
    def _fill(
        step: _StaticStep, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch
    ) -> None:
        n, width = batch.num_seqs, batch.block_table.shape[1]
        static = step.batch
        step.input_ids[:n].copy_(input_ids)
        step.positions[:n].copy_(positions)
        static.seq_lens[:n].copy_(batch.seq_lens)
        static.seq_lens[n:].fill_(1)
        static.slot_mapping[:n].copy_(batch.slot_mapping)
        static.slot_mapping[n:].fill_(-1)
        static.block_table[:n, :width].copy_(batch.block_table)
