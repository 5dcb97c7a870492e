"""TritonBackend: the paged cache and attention of every Triton-capable GPU backend.

A vendor package subclasses it and supplies what differs per vendor: its torch device type,
the device probe, capabilities, launch tiles and (optionally) graph capture (see
crossinfer_cuda, crossinfer_rocm, crossinfer_xpu). The device itself is reached only through
torch's module for that device type (``torch.get_device_module``: ``torch.cuda`` for NVIDIA
and ROCm builds, ``torch.xpu`` for Intel), so nothing here is tied to one vendor.

Emulation: with ``CROSSINFER_EMULATE=1`` in the environment when the backend is built (the
conformance suite's ``--emulate`` sets it), the kernels run under Triton's interpreter on CPU
tensors, the probe succeeds without a GPU, collectives use gloo, and ``Capabilities.emulated``
says so. The interpreter is chosen when ``@triton.jit`` runs, for triton's own library when
``triton.language`` is first imported: this package sets ``TRITON_INTERPRET=1`` as it is
imported (entry points load before models), the kernel modules are imported only after that
(see :func:`_kernels`), and the probe refuses, saying why, when triton was imported earlier.
"""

from __future__ import annotations

import abc
import functools
import importlib
import importlib.util
import os
import platform
import sys
from dataclasses import replace
from types import ModuleType

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
from crossinfer_triton.graphs import Capture
from crossinfer_triton.tiles import AttentionTiles

EMULATED_CORES = 64
"""Compute units the split-K policy assumes under the interpreter (it runs programs serially,
so this only decides which code path the tests exercise)."""
EMULATED_SPLIT_MIN_CONTEXT = 256
ENFORCE_EAGER_ENV = "CROSSINFER_ENFORCE_EAGER"
"""Set to "1" to run every step eagerly, without graph capture (for debugging)."""


def emulation_requested() -> bool:
    """CROSSINFER_EMULATE=1; also turns on Triton's interpreter if triton is not loaded yet."""
    if os.environ.get(EMULATE_ENV) != "1":
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def _interpreter_problem() -> str:
    """Why Triton's interpreter cannot run our kernels in this process; "" when it can."""
    if "triton.language" not in sys.modules:
        return ""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(sys.modules["triton.language"].standard.zeros, InterpretedFunction):
        return ""
    return (
        "triton was imported before emulation was requested, so its library is compiled for a "
        "GPU, not interpreted; also export TRITON_INTERPRET=1 before starting the process"
    )


@functools.cache
def _kernels() -> tuple[ModuleType, ModuleType]:
    cache_ops = importlib.import_module("crossinfer_triton.cache_ops")
    attention = importlib.import_module("crossinfer_triton.paged_attention")
    return cache_ops, attention


class TritonBackend(Backend):
    """Paged KV cache, write_kv, attention and copy_blocks in Triton; the rest per vendor."""

    torch_device_type = "cuda"
    """torch's device type for this vendor's GPUs (ROCm builds of torch also say "cuda")."""

    def __init__(self) -> None:
        self.emulated = emulation_requested()
        self._num_cores: int | None = None
        self._tiles: AttentionTiles | None = None

    @property
    def device_module(self) -> ModuleType:
        """torch's module for this vendor's device type: ``torch.cuda``, ``torch.xpu``."""
        return torch.get_device_module(self.torch_device_type)

    # -- what a vendor provides -------------------------------------------------------------
    @abc.abstractmethod
    def hardware_probe(self) -> Probe:
        """The probe on real hardware: SDK build of torch, devices present."""

    @abc.abstractmethod
    def hardware_capabilities(self) -> Capabilities:
        """Capabilities on real hardware (``emulated`` False)."""

    @abc.abstractmethod
    def hardware_tiles(self) -> AttentionTiles:
        """Launch parameters of the attention kernel on this vendor's GPUs."""

    def graph_capture(self) -> Capture | None:
        """How to capture decode graphs on this vendor's GPUs (``graphs.device_graph_capture``
        with its graph type), or None (the default): every step runs eagerly. Called only when
        the capabilities declare graph capture."""
        return None

    def compute_units(self, properties: object) -> int:
        """Compute units in the device's properties (SMs, CUs): the split-K policy fills them.
        The default reads ``multi_processor_count`` (NVIDIA; AMD's CUs under the same name)."""
        return int(getattr(properties, "multi_processor_count"))  # noqa: B009

    # -- identity and discovery -------------------------------------------------------------
    def probe(self) -> Probe:
        if importlib.util.find_spec("triton") is None:
            return Probe(False, "the triton package is not installed; pip install triton")
        if not self.emulated:
            return self.hardware_probe()
        problem = _interpreter_problem()
        if problem:
            return Probe(False, f"cannot emulate {self.name}: {problem}")
        cpu = platform.processor() or platform.machine() or "cpu"
        return Probe(True, devices=(f"Triton interpreter on {cpu} (emulated {self.name})",))

    def capabilities(self) -> Capabilities:
        caps = self.hardware_capabilities()
        if not self.emulated:
            return caps
        # fp32 first: the interpreter is slow and casts bf16 dots anyway. Host memory is shared.
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        return replace(
            caps,
            dtypes=dtypes,
            kv_cache_dtypes=dtypes,
            graph_capture=False,
            distributed_backend="gloo",
            emulated=True,
            default_kv_cache_bytes=256 << 20,
        )

    def device(self) -> torch.device:
        if self.emulated:
            return torch.device("cpu")
        return torch.device(self.torch_device_type, self.device_module.current_device())

    # -- memory -----------------------------------------------------------------------------
    def memory_info(self) -> MemoryInfo:
        if self.emulated:
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            return MemoryInfo(total, page * os.sysconf("SC_AVPHYS_PAGES"))
        module, device = self.device_module, self.device()
        try:
            free, total = module.mem_get_info(device)
        except (AttributeError, RuntimeError):
            # Runtimes that cannot say what is free (older XPU drivers): the device's total,
            # less what this process's allocator holds.
            total = int(module.get_device_properties(device).total_memory)
            free = total - int(module.memory_reserved(device))
        return MemoryInfo(int(total), int(free))

    def allocate_kv_cache(self, spec: KVCacheSpec, num_blocks: int) -> list[torch.Tensor]:
        shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size)
        device = self.device()
        return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: torch.Tensor) -> None:
        cache_ops, _ = _kernels()
        cache_ops.copy_blocks(kv_caches, src_to_dst)

    def read_kv(
        self, kv_cache: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = kv_cache.flatten(1, 2)  # [2, num_slots, num_kv_heads, head_size]
        return rows[0, slots], rows[1, slots]

    # -- attention --------------------------------------------------------------------------
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        cache_ops, _ = _kernels()
        cache_ops.write_kv(key, value, kv_cache, slot_mapping)

    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, scale: float
    ) -> torch.Tensor:
        _, kernels = _kernels()
        tiles = self.tiles()
        if query.stride(-1) != 1:
            query = query.contiguous()
        splits = kernels.num_splits(batch, kv_cache.shape[3], self.num_cores(), tiles)
        return kernels.paged_attention(query, kv_cache, batch, scale, tiles, splits)

    def tiles(self) -> AttentionTiles:
        """The vendor's tiles; under the interpreter with fp32 dots (bf16 ones are wrong there)
        and split-K from short contexts, so tiny test shapes exercise it."""
        if self._tiles is None:
            tiles = self.hardware_tiles()
            if self.emulated:
                tiles = replace(tiles, dot_fp32=True, split_min_context=EMULATED_SPLIT_MIN_CONTEXT)
            self._tiles = tiles
        return self._tiles

    def num_cores(self) -> int:
        """Compute units (SMs, CUs) of the device: the split-K policy fills them."""
        if self._num_cores is None:
            if self.emulated:
                self._num_cores = EMULATED_CORES
            else:
                props = self.device_module.get_device_properties(self.device())
                self._num_cores = self.compute_units(props)
        return self._num_cores

    # -- collectives ------------------------------------------------------------------------
    def communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        if self.emulated:
            return TorchDistributedCommunicator(rank, world_size, init_method, pg_backend="gloo")
        module = self.device_module
        module.set_device(rank % module.device_count())
        # "nccl" on NVIDIA and AMD (ROCm's torch.distributed runs RCCL under that name),
        # "xccl" on Intel.
        pg_backend = self.hardware_capabilities().distributed_backend
        communicator = TorchDistributedCommunicator(rank, world_size, init_method, pg_backend)
        # One collective now: the first sets up the library's communicators (slow, and on
        # some runtimes lazily), so it should not land in the first step.
        communicator.all_reduce(torch.zeros(1, device=self.device()))
        return communicator

    # -- execution --------------------------------------------------------------------------
    def synchronize(self) -> None:
        if not self.emulated:
            self.device_module.synchronize(self.device())

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds every accelerator of the build too

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Replay decode steps from device graphs (see crossinfer_triton.graphs) when the
        capabilities declare graph capture, the vendor says how to capture, and
        CROSSINFER_ENFORCE_EAGER is not "1"."""
        if not self.capabilities().graph_capture or os.environ.get(ENFORCE_EAGER_ENV) == "1":
            return model
        capture = self.graph_capture()
        if capture is None:
            return model
        from crossinfer_triton.graphs import GraphedDecode

        return GraphedDecode(model, capture)
