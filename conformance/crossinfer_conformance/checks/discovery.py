"""L0 discovery: the entry point, the api version, and a probe that is cheap and honest."""

from __future__ import annotations

import importlib.metadata
import time
from typing import TYPE_CHECKING

import torch

from crossinfer.backend import CONTRACT_VERSION, KVCacheSpec
from crossinfer.engine.batch import build_attention_batch
from crossinfer_conformance.cases import Case
from crossinfer_conformance.info import ProbeTiming
from crossinfer_conformance.kv_write import write
from crossinfer_conformance.outcome import CheckFailed, describe_exc

if TYPE_CHECKING:
    from crossinfer_conformance.context import CheckContext

PROBE_BUDGET_S = 2.0
"""probe() runs for every backend whenever any command starts; more than this is not cheap."""


def first_probe(ep: importlib.metadata.EntryPoint) -> ProbeTiming:
    """Load, construct and probe the backend once, timing the probe and watching whether it
    created an accelerator context. Call it first thing in a fresh process."""
    before, note = _initialised_accelerators()
    try:
        backend = ep.load()()
    except Exception as exc:
        return ProbeTiming(0.0, error=f"loading {ep.value} raised {describe_exc(exc)}")
    start = time.perf_counter()
    try:
        backend.probe()
    except Exception as exc:
        elapsed = time.perf_counter() - start
        return ProbeTiming(elapsed, error=f"probe() raised {describe_exc(exc)}")
    elapsed = time.perf_counter() - start
    after, _ = _initialised_accelerators()
    return ProbeTiming(elapsed, initialised=", ".join(sorted(after - before)), note=note)


def _initialised_accelerators() -> tuple[set[str], str]:
    # torch names the accelerator it was built for; its device module (looked up by that
    # name, so nothing here names a vendor) says whether a context exists.
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return set(), "torch sees no accelerator here, so only the time was checked"
    module = getattr(torch, accelerator.type, None)
    is_initialized = getattr(module, "is_initialized", None)
    if not callable(is_initialized):
        return set(), f"torch.{accelerator.type} cannot say whether a context exists"
    return ({accelerator.type} if is_initialized() else set()), ""


def check_entry_point(ctx: CheckContext, case: Case) -> None:
    """One distribution registers the name, and the class's ``name`` is the entry point's."""
    info = ctx.info
    if info.num_entry_points != 1:
        raise CheckFailed(
            f"{info.num_entry_points} installed distributions register the entry point "
            f"{info.name!r} in crossinfer.backends; exactly one may"
        )
    if ctx.backend.name != info.name:
        raise CheckFailed(
            f"{info.entry_point} has name = {ctx.backend.name!r} but is registered as "
            f"{info.name!r}; Backend.name must equal the entry-point name"
        )


def check_api_version(ctx: CheckContext, case: Case) -> None:
    """The contract major the backend was written for is this crossinfer's."""
    api = ctx.backend.api_version
    if api[0] != CONTRACT_VERSION[0]:
        raise CheckFailed(
            f"api_version {api[0]}.{api[1]} does not match contract "
            f"{CONTRACT_VERSION[0]}.{CONTRACT_VERSION[1]}: the major versions must be equal"
        )


def check_probe_cheap(ctx: CheckContext, case: Case) -> None:
    """The first probe() in a fresh process is fast, does not raise, creates no context."""
    timing = ctx.info.probe
    if timing is None:
        raise CheckFailed("the entry point was not found, so probe() was never timed")
    if timing.error:
        raise CheckFailed(timing.error)
    if timing.seconds > PROBE_BUDGET_S:
        raise CheckFailed(
            f"the first probe() took {timing.seconds:.2f} s (budget {PROBE_BUDGET_S} s); it "
            "runs whenever any crossinfer command starts, so it must stay cheap"
        )
    if timing.initialised:
        raise CheckFailed(
            f"probe() created a {timing.initialised} device context; it must answer without "
            "one (query the driver, count devices) and leave device setup to later calls"
        )


def check_probe_honest(ctx: CheckContext, case: Case) -> None:
    """available=True means the device really runs a tensor op, a KV write and attention."""
    probe = ctx.backend.probe()
    if not probe.available:
        raise CheckFailed(f"probe() now says unavailable: {probe.reason}")
    if not probe.devices:
        raise CheckFailed("probe() says available but names no device in Probe.devices")
    step = "backend.device()"
    try:
        device = ctx.backend.device()
        step = f"a tensor operation on {device}"
        if int(torch.arange(4, device=device).sum().item()) != 6:
            raise CheckFailed(f"torch.arange(4).sum() on {device} is not 6")
        step = "a tiny allocate_kv_cache + write_kv + attention"
        _tiny_attention(ctx, device)
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(
            f"probe() says available (devices: {', '.join(probe.devices)}) but the device is "
            f"not usable: {step} raised {describe_exc(exc)}; when it cannot run, probe() "
            "must return Probe(False, reason)"
        ) from exc


def _tiny_attention(ctx: CheckContext, device: torch.device) -> None:
    caps = ctx.backend.capabilities()
    dtype, head = caps.dtypes[0], (64 if 64 in caps.head_sizes else caps.head_sizes[0])
    block_size = caps.default_block_size
    blocks = list(range(1, 1 + -(-3 // block_size)))
    spec = KVCacheSpec(1, 1, head, block_size, dtype)
    (cache,) = ctx.backend.allocate_kv_cache(spec, len(blocks) + 1)
    batch = build_attention_batch([3], [3], [blocks], block_size, device)
    kv = torch.ones(3, 1, head, dtype=dtype, device=device)
    cache = write(ctx.backend, kv, kv, cache, batch.slot_mapping)
    out = ctx.backend.attention(kv, cache, batch, head**-0.5)
    ctx.backend.synchronize()
    if tuple(out.shape) != (3, 1, head) or not bool(torch.isfinite(out).all()):
        raise CheckFailed("a 3-token attention gave a wrong shape or non-finite values")
