"""write_kv as every check calls it: in place, or functionally (contract 1.2), whichever the
backend does, the cache to use afterwards comes back."""

from __future__ import annotations

import torch

from crossinfer.backend import Backend


def write(
    backend: Backend,
    keys: torch.Tensor,
    values: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """The cache after ``backend.write_kv``: the one it returned, or ``cache`` updated."""
    new = backend.write_kv(keys, values, cache, slots)
    return cache if new is None else new
