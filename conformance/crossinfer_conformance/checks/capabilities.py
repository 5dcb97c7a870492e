"""L1 capabilities: the Capabilities object itself is usable. (Every advertised dtype, block
size and head size then runs as its own L1 case, through the attention and write_kv checks.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from crossinfer_conformance.cases import Case
from crossinfer_conformance.outcome import CheckFailed

if TYPE_CHECKING:
    from crossinfer_conformance.context import CheckContext


def check_capabilities(ctx: CheckContext, case: Case) -> None:
    """Non-empty lists of the right types, a default block size among the block sizes."""
    caps = ctx.backend.capabilities()
    problems = [
        f"{name} is empty"
        for name in ("dtypes", "kv_cache_dtypes", "block_sizes", "head_sizes")
        if not getattr(caps, name)
    ]
    for name in ("dtypes", "kv_cache_dtypes"):
        odd = [d for d in getattr(caps, name) if not isinstance(d, torch.dtype)]
        if odd:
            problems.append(f"{name} holds {odd!r}, not torch dtypes")
    for name in ("block_sizes", "head_sizes"):
        odd = [n for n in getattr(caps, name) if not (isinstance(n, int) and n > 0)]
        if odd:
            problems.append(f"{name} holds {odd!r}, not positive ints")
    if caps.default_block_size not in caps.block_sizes:
        problems.append(
            f"default_block_size {caps.default_block_size} is not among block_sizes "
            f"{tuple(caps.block_sizes)}"
        )
    if not caps.distributed_backend:
        problems.append("distributed_backend is empty")
    if problems:
        raise CheckFailed("Capabilities: " + "; ".join(problems))
