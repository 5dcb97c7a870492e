"""CpuBackend: the reference implementation of the Backend contract."""

from __future__ import annotations

import os
import platform

import torch

from crossinfer.backend import (
    AttentionBatch,
    Backend,
    Capabilities,
    Communicator,
    KVCacheSpec,
    MemoryInfo,
    Probe,
)
from crossinfer.distributed.communicator import TorchDistributedCommunicator
from crossinfer_cpu import attention
from crossinfer_cpu.prepare import prepare_layers, quantize_layers


def _read_meminfo() -> dict[str, int]:
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return fields


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CpuBackend(Backend):
    """Plain PyTorch on the host CPU; always available."""

    name = "cpu"

    def __init__(self) -> None:
        # The attention plan of the latest batch: every layer of a step passes the same
        # (frozen) batch, so the indices and masks are built once per step.
        self._planned: tuple[AttentionBatch, attention.AttentionPlan] | None = None

    def probe(self) -> Probe:
        cpu = platform.processor() or platform.machine() or "cpu"
        return Probe(available=True, devices=(f"{cpu} ({_usable_cores()} cores)",))

    def capabilities(self) -> Capabilities:
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        return Capabilities(
            dtypes=dtypes,
            kv_cache_dtypes=dtypes,
            block_sizes=(1, 8, 16, 32, 64, 128),
            head_sizes=(32, 64, 80, 96, 128, 256),
            prefix_caching=True,
            graph_capture=False,
            distributed_backend="gloo",
            # Host memory is shared with everything else on the machine.
            default_kv_cache_bytes=4 << 30,
            quantizations=("int8",),
        )

    def device(self) -> torch.device:
        return torch.device("cpu")

    def memory_info(self) -> MemoryInfo:
        info = _read_meminfo()
        if "MemTotal" in info:
            return MemoryInfo(info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0)))
        page = os.sysconf("SC_PAGE_SIZE")
        return MemoryInfo(page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES"))

    def allocate_kv_cache(self, spec: KVCacheSpec, num_blocks: int) -> list[torch.Tensor]:
        shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
        return [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        attention.copy_blocks(kv_caches, src_to_dst)

    def read_kv(
        self, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attention.read_kv(kv_cache, slots)

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        attention.write_kv(key, value, kv_cache, slot_mapping)

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float
    ) -> torch.Tensor:
        per_kv = query.shape[1] // kv_cache.shape[3]
        planned = self._planned
        if planned is None or planned[0] is not batch or planned[1].per_kv != per_kv:
            planned = (batch, attention.plan(batch, kv_cache.shape[1], kv_cache.shape[2], per_kv))
            self._planned = planned
        return attention.paged_attention(query, kv_cache, planned[1], scale)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Swap in the CPU's layers (linear.py, pointwise.py; see prepare.py) and give torch's
        intra-op pool one thread per core this process may run on (torch's own default counts
        the machine's physical cores, not the affinity mask)."""
        torch.set_num_threads(_usable_cores())
        return prepare_layers(model)

    def quantize_model(self, model: torch.nn.Module, method: str) -> torch.nn.Module:
        """int8: every linear layer becomes an ``Int8Linear`` (int8.py); ``prepare_model``
        then leaves them as they are."""
        if method not in self.capabilities().quantizations:
            raise ValueError(f"quantization {method!r}: the cpu backend supports only 'int8'")
        return quantize_layers(model)

    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        return TorchDistributedCommunicator(rank, world_size, init_method, pg_backend="gloo")
