"""L3 memory: memory_info, the size and place of KV allocations, and freeing.

Whether freed memory came back is measured with the best meter the device has: the
process's resident memory for the host CPU (memory_info there is the whole machine's, moved
by every other process), torch's allocator counters for torch's own accelerator, and
memory_info's free bytes for anything else.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from crossinfer.backend import KVCacheSpec
from crossinfer_conformance.cases import KV_HEADS, Case
from crossinfer_conformance.outcome import CheckFailed, NotSupported

if TYPE_CHECKING:
    from crossinfer_conformance.context import CheckContext

MIB = 1 << 20
FREE_TEST_BYTES = 96 * MIB
"""Big enough to see over allocator noise; each layer above glibc's largest mmap threshold
(32 MiB), so the host allocator hands it back to the system on free."""


def check_memory_info(ctx: CheckContext, case: Case) -> None:
    """Integers with 0 < free <= total."""
    info = ctx.backend.memory_info()
    total, free = info.total_bytes, info.free_bytes
    if not (isinstance(total, int) and isinstance(free, int)):
        raise CheckFailed(f"memory_info() gave {total!r} / {free!r}; both must be int bytes")
    if not 0 < free <= total:
        raise CheckFailed(
            f"memory_info() says {free / MIB:.1f} MiB free of {total / MIB:.1f} MiB; "
            "expected 0 < free <= total"
        )


def check_allocate_kv_cache(ctx: CheckContext, case: Case) -> None:
    """One tensor per layer on the backend's device, at least the bytes the spec asks for
    (padding allowed up to twice that)."""
    from crossinfer_conformance.context import torch_dtype

    spec = KVCacheSpec(3, KV_HEADS, case.head_size, case.block_size, torch_dtype(case.kv_dtype))
    num_blocks = 12
    caches = ctx.backend.allocate_kv_cache(spec, num_blocks)
    if len(caches) != spec.num_layers:
        raise CheckFailed(f"{len(caches)} tensors for {spec.num_layers} layers; expected one each")
    device = ctx.device()
    for layer, cache in enumerate(caches):
        if cache.device.type != device.type:
            raise CheckFailed(f"layer {layer}'s cache is on {cache.device}, not on {device}")
    wanted = num_blocks * spec.bytes_per_block
    got = _storage_bytes(caches)
    if not wanted <= got <= 2 * wanted:
        raise CheckFailed(
            f"{num_blocks} blocks of {spec.bytes_per_block} bytes took {got} bytes; expected "
            f"{wanted} (num_blocks * spec.bytes_per_block), padding allowed up to twice that"
        )


def _storage_bytes(caches: list[torch.Tensor]) -> int:
    # Distinct storages, so views of one buffer are counted once. Lazy devices (XLA) keep no
    # host-visible storage: count each tensor's own bytes there.
    try:
        storages = {c.untyped_storage().data_ptr(): c.untyped_storage().nbytes() for c in caches}
    except RuntimeError:
        return sum(c.numel() * c.element_size() for c in caches)
    return sum(storages.values())


def check_free_memory(ctx: CheckContext, case: Case) -> None:
    """After the caches are dropped, the memory they took is usable again."""
    meter, name = _meter(ctx)
    caps = ctx.backend.capabilities()
    kv_dtype = torch.float32 if torch.float32 in caps.kv_cache_dtypes else caps.kv_cache_dtypes[0]
    spec = KVCacheSpec(2, KV_HEADS, case.head_size, case.block_size, kv_dtype)
    num_blocks = max(1, FREE_TEST_BYTES // spec.bytes_per_block)
    size = num_blocks * spec.bytes_per_block
    gc.collect()
    ctx.backend.synchronize()
    baseline = meter()
    caches = ctx.backend.allocate_kv_cache(spec, num_blocks)
    ctx.backend.synchronize()
    held = meter() - baseline
    del caches
    gc.collect()
    ctx.backend.synchronize()
    left = meter() - baseline
    if held < size // 2:
        raise NotSupported(
            f"allocating {size / MIB:.0f} MiB raised {name} by only {held / MIB:.1f} MiB "
            "(memory committed lazily?), so its release cannot be observed"
        )
    if left > size // 10 + 4 * MIB:
        raise CheckFailed(
            f"after dropping a {size / MIB:.0f} MiB KV cache and collecting garbage, {name} "
            f"still shows {left / MIB:.1f} MiB of it in use (it rose {held / MIB:.1f} MiB)"
        )


def _meter(ctx: CheckContext) -> tuple[Callable[[], int], str]:
    device = ctx.device()
    if device.type == "cpu":
        if not os.path.exists("/proc/self/statm"):
            raise NotSupported("no /proc/self/statm to read this process's resident memory")
        return _resident_bytes, "this process's resident memory"
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is not None and accelerator.type == device.type:
        return (lambda: int(torch.accelerator.memory_allocated(device))), (
            f"torch.accelerator.memory_allocated({device})"
        )

    def used() -> int:
        info = ctx.backend.memory_info()
        return info.total_bytes - info.free_bytes

    return used, "memory_info()'s used bytes"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
