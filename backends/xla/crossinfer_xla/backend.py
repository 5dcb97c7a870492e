"""XlaBackend: what every torch-xla device shares.

A vendor package (crossinfer_tpu) subclasses it and supplies its probe, capabilities, static
shapes and (optionally) a hardware attention kernel. Shared here: the XLA device, memory
(XLA's figures where the runtime reports them, a declared fallback where it does not), the
reference static-shape ops of ``static_ops`` in the vendor's cache layout, block copies padded
to a fixed count, the step hooks (``end_step`` cuts and runs the step's graph), the persistent
compile cache, the compiled-graph counter, and collectives (torch.distributed's ``xla``
process group on hardware, gloo when emulated).

Emulation (``CROSSINFER_EMULATE=1``): XLA's CPU device (``PJRT_DEVICE=CPU``) runs the same
graphs; hardware kernels are not available and say so.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
import os
from dataclasses import replace
from typing import Any

import torch

from crossinfer.backend import (
    EMULATE_ENV,
    AttentionBatch,
    Backend,
    Capabilities,
    Communicator,
    KVCacheSpec,
    MemoryInfo,
    Probe,
)
from crossinfer.distributed.communicator import TorchDistributedCommunicator
from crossinfer_xla import static_ops
from crossinfer_xla.static_ops import KVLayout

logger = logging.getLogger("crossinfer.xla")

PAIRINGS = "torch-xla 2.8.1 with torch 2.8.0, or torch-xla 2.9.0 with torch 2.9.0"
COPY_PAIRS = 16  # block copies run in batches of this many pairs (one compiled shape)


def torch_xla_missing() -> str:
    """Why torch_xla cannot be used here; "" when it can be imported (without importing it)."""
    if importlib.util.find_spec("torch_xla") is None:
        return (
            f"torch-xla is not installed; it pairs only with its own torch ({PAIRINGS}), "
            f"and this torch is {torch.__version__}"
        )
    return ""


class XlaBackend(Backend):
    """A torch-xla device: the reference static-shape ops, XLA steps and compile cache."""

    layout: KVLayout = static_ops.SPLIT
    """The vendor's KV-cache layout."""

    def __init__(self) -> None:
        self.emulated = os.environ.get(EMULATE_ENV) == "1"
        if self.emulated:  # before torch_xla is imported: XLA's CPU device
            os.environ.setdefault("PJRT_DEVICE", "CPU")
        self._device: torch.device | None = None
        self._head_size: int | None = None  # the model's (the cache may store it padded)

    # -- what a vendor provides -------------------------------------------------------------
    @abc.abstractmethod
    def hardware_probe(self) -> Probe:
        """The probe on real hardware: the vendor's torch-xla stack importable (check it with
        ``torch_xla_missing``) and its device present; cheap, no PJRT client."""

    @abc.abstractmethod
    def hardware_capabilities(self) -> Capabilities:
        """Capabilities on real hardware (``emulated`` False)."""

    def fallback_memory_bytes(self) -> int:
        """Device memory to assume where the runtime cannot report it."""
        return 16 << 30

    def hardware_attention(
        self, query: torch.Tensor, cache: torch.Tensor, batch: AttentionBatch, scale: float
    ) -> torch.Tensor | None:
        """The vendor's attention kernel, or None to use the reference ops (the default)."""
        return None

    # -- identity and discovery -------------------------------------------------------------
    def probe(self) -> Probe:
        if not self.emulated:
            return self.hardware_probe()
        missing = torch_xla_missing()
        if missing:
            return Probe(False, missing)
        return Probe(True, devices=(f"XLA CPU device (emulated {self.name})",))

    def capabilities(self) -> Capabilities:
        caps = self.hardware_capabilities()
        if not self.emulated:
            return caps
        dtypes = (torch.float32, torch.bfloat16)
        return replace(
            caps,
            dtypes=dtypes,
            kv_cache_dtypes=dtypes,
            distributed_backend="gloo",
            emulated=True,
            default_kv_cache_bytes=64 << 20,
            native_attention=False,  # the reference ops stand in for the device's kernel
        )

    def device(self) -> torch.device:
        if self._device is None:
            import torch_xla

            self._device = torch_xla.device()
        return self._device

    # -- memory -----------------------------------------------------------------------------
    def memory_info(self) -> MemoryInfo:
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(self.device())
            total = int(info["bytes_limit"])
            return MemoryInfo(total, total - int(info["bytes_used"]))
        except (RuntimeError, KeyError, TypeError):  # UNIMPLEMENTED on XLA's CPU device
            if self.emulated:
                page = os.sysconf("SC_PAGE_SIZE")
                total = page * os.sysconf("SC_PHYS_PAGES")
                return MemoryInfo(total, page * os.sysconf("SC_AVPHYS_PAGES"))
            total = self.fallback_memory_bytes()
            return MemoryInfo(total, total)

    def allocate_kv_cache(self, spec: KVCacheSpec, num_blocks: int) -> list[torch.Tensor]:
        self._head_size = spec.head_size
        shape = self.layout.shape(spec, num_blocks)
        device = self.device()
        return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        # Padded to a multiple of COPY_PAIRS with copies of the first pair (repeating a copy
        # changes nothing), so any number of pairs runs one compiled shape per batch.
        pairs = src_to_dst.to(self.device())
        for begin in range(0, pairs.shape[0], COPY_PAIRS):
            part = pairs[begin : begin + COPY_PAIRS]
            if part.shape[0] < COPY_PAIRS:
                part = torch.cat([part, part[:1].expand(COPY_PAIRS - part.shape[0], 2)])
            static_ops.copy_blocks(self.layout, kv_caches, part)

    def read_kv(
        self, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        head = self._head_size or int(kv_cache.shape[-1])
        keys, values = static_ops.read_kv(self.layout, kv_cache, slots.to(kv_cache.device), head)
        return keys.cpu(), values.cpu()

    # -- attention --------------------------------------------------------------------------
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        static_ops.write_kv(self.layout, key, value, kv_cache, slot_mapping, in_place=True)
        return None

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float
    ) -> torch.Tensor:
        out = None if self.emulated else self.hardware_attention(query, kv_cache, batch, scale)
        if out is None:
            out = static_ops.attention(self.layout, query, kv_cache, batch, scale)
        return out

    # -- collectives ------------------------------------------------------------------------
    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        if self.emulated:  # gloo takes host tensors only: stage through the host
            group = TorchDistributedCommunicator(rank, world_size, init_method, pg_backend="gloo")
            return HostStagedCommunicator(group)
        import torch_xla.distributed.xla_backend  # noqa: F401 - registers the "xla" group

        return TorchDistributedCommunicator(rank, world_size, init_method, pg_backend="xla")

    # -- execution --------------------------------------------------------------------------
    def synchronize(self) -> None:
        import torch_xla

        torch_xla.sync()

    def end_step(self) -> None:
        import torch_xla

        torch_xla.sync()  # cut the step's graph here and run it

    def set_compile_cache_dir(self, path: str) -> None:
        import torch_xla.runtime as xr

        os.makedirs(path, exist_ok=True)
        try:
            xr.initialize_cache(path, readonly=False)
        except (AssertionError, RuntimeError, ValueError) as exc:
            # Once per process, before the first computation; or the runtime lacks it.
            logger.info("XLA compile cache at %s not (re)initialised: %s", path, exc)

    def compiled_graph_count(self) -> int | None:
        import torch_xla.debug.metrics as metrics

        data: Any = metrics.metric_data("CompileTime")
        return int(data[0]) if data else 0


class HostStagedCommunicator(Communicator):
    """Collectives of a host-only process group (gloo) on device tensors: each tensor is
    copied to the host, reduced there and copied back (emulation only: slow, but exact)."""

    def __init__(self, group: TorchDistributedCommunicator) -> None:
        self.group = group
        self.rank, self.world_size = group.rank, group.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.copy_(self.group.all_reduce(tensor.cpu()))

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return self.group.all_gather(tensor.cpu(), dim).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor.copy_(self.group.broadcast(tensor.cpu(), src))

    def barrier(self) -> None:
        self.group.barrier()

    def close(self) -> None:
        self.group.close()
