"""What the worker learns about the backend under test, as plain data (no torch), so the
pytest process can build cases and the report without importing torch or the backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CapsInfo:
    """:class:`crossinfer.backend.Capabilities` with dtypes as short names (fp32, bf16)."""

    dtypes: tuple[str, ...]
    kv_cache_dtypes: tuple[str, ...]
    block_sizes: tuple[int, ...]
    head_sizes: tuple[int, ...]
    prefix_caching: bool
    graph_capture: bool
    distributed_backend: str
    emulated: bool
    default_block_size: int
    static_shapes: bool = False
    """The backend declares static shapes (a compiled-graph device, contract 1.2)."""
    native_attention: bool = True


@dataclass(frozen=True)
class ProbeTiming:
    """The backend's first probe() in a fresh process (the L0 "probe is cheap" check)."""

    seconds: float
    """Wall time of that first call."""
    initialised: str = ""
    """Accelerator type whose context the probe created ("" when none did)."""
    note: str = ""
    """Why the context check could not conclude, when it could not."""
    error: str = ""
    """What loading, constructing or probing raised, if anything."""


@dataclass(frozen=True)
class SessionInfo:
    """The backend under test, as the report names it."""

    name: str
    problem: str = ""
    """Why the suite cannot run on this backend (unknown, not available, fails to load)."""
    package: str = ""
    version: str = ""
    api_version: str = ""
    contract_version: str = ""
    entry_point: str = ""
    """The entry point's target, e.g. ``crossinfer_cpu:CpuBackend``."""
    num_entry_points: int = 0
    """How many installed distributions register this name (one is right)."""
    devices: tuple[str, ...] = ()
    caps: CapsInfo | None = None
    probe: ProbeTiming | None = None
    torch_version: str = ""
    crossinfer_version: str = ""
