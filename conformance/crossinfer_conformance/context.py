"""The worker's view of the run: the backend under test, the CPU reference, the seed.

Built once per worker process by :func:`open_context`, which first times the backend's very
first probe() (the process is fresh, so nothing has touched a device yet), then resolves the
backend the way every crossinfer command does.
"""

from __future__ import annotations

import importlib.metadata
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import crossinfer
from crossinfer.backend import CONTRACT_VERSION, Backend, Capabilities
from crossinfer.registry import NAMESPACE, DeviceError, discover, resolve_device
from crossinfer_conformance.checks.discovery import first_probe
from crossinfer_conformance.info import CapsInfo, SessionInfo
from crossinfer_conformance.outcome import NotSupported
from crossinfer_cpu import CpuBackend

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_LONG = {short: dtype for dtype, short in _SHORT.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, bf16, fp16; other dtypes by torch's name (float8_e4m3fn)."""
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


def torch_dtype(name: str) -> torch.dtype:
    """The inverse of :func:`dtype_name`."""
    if name in _LONG:
        return _LONG[name]
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise NotSupported(f"this torch has no dtype {name}")
    return dtype


@dataclass
class CheckContext:
    """What every check gets: the backend under test and the reference, in one worker."""

    backend: Backend
    reference: CpuBackend
    info: SessionInfo
    seed: int
    run_dir: Path
    """A folder the pytest process created for this run and removes after it."""
    memo: dict[str, Any] = field(default_factory=dict)
    """Work shared by several cases of this worker: the L4 group's results, the L5 model."""

    def generator(self, case_id: str) -> torch.Generator:
        """A host generator seeded by the run's seed and the case id, so a case filtered
        with -k sees the inputs it sees in a full run."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(case_id.encode()))

    def device(self) -> torch.device:
        return self.backend.device()


def open_context(name: str, seed: int, run_dir: Path) -> tuple[CheckContext | None, SessionInfo]:
    """Load and describe backend ``name``; the context is None when it cannot run here."""
    name = name.strip().lower()  # as --device matches names
    eps = [ep for ep in importlib.metadata.entry_points(group=NAMESPACE) if ep.name == name]
    timing = first_probe(eps[0]) if eps else None
    every = discover()
    infos = [row for row in every if row.name == name]
    base = SessionInfo(
        name=name,
        contract_version=_version(CONTRACT_VERSION),
        entry_point=eps[0].value if eps else "",
        num_entry_points=len(eps),
        probe=timing,
        torch_version=torch.__version__,
        crossinfer_version=crossinfer.__version__,
    )
    if infos:
        row = infos[0]
        base = replace(
            base, package=row.package, version=row.version, api_version=row.api, devices=row.devices
        )
    try:
        backend = resolve_device(name, every)
    except DeviceError as exc:
        return None, replace(base, problem=str(exc))
    info = replace(base, caps=caps_info(backend.capabilities(), backend))
    return CheckContext(backend, CpuBackend(), info, seed, run_dir), info


def caps_info(caps: Capabilities, backend: Backend | None = None) -> CapsInfo:
    """Capabilities (and whether the backend declares static shapes) as plain data for the
    pytest process."""
    from crossinfer_conformance.checks.static import KERNEL_LIMITS

    static = backend is not None and backend.static_shapes(KERNEL_LIMITS) is not None
    return CapsInfo(
        dtypes=tuple(dtype_name(d) for d in caps.dtypes),
        kv_cache_dtypes=tuple(dtype_name(d) for d in caps.kv_cache_dtypes),
        block_sizes=tuple(caps.block_sizes),
        head_sizes=tuple(caps.head_sizes),
        prefix_caching=caps.prefix_caching,
        graph_capture=caps.graph_capture,
        distributed_backend=caps.distributed_backend,
        emulated=caps.emulated,
        default_block_size=caps.default_block_size,
        static_shapes=static,
        native_attention=caps.native_attention,
    )


def _version(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"
