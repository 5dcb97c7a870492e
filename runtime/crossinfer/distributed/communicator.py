"""A Communicator on torch.distributed, shared by every backend that names its process-group
backend (gloo, nccl, xccl, ...). Nothing here knows which device the tensors live on."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from crossinfer.backend import Communicator


class TorchDistributedCommunicator(Communicator):
    """Collectives over one torch.distributed process group.

    The group is created on construction; ``close`` destroys it. ``pg_backend`` is the name
    torch.distributed knows (``gloo``, ``nccl``, ``xccl``).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        pg_backend: str,
        timeout_s: float = 300.0,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        if dist.is_initialized() and dist.get_world_size() != world_size:
            raise RuntimeError(
                f"this process is already in a torch.distributed group of "
                f"{dist.get_world_size()} ranks, not {world_size}; close it first"
            )
        if not dist.is_initialized():
            dist.init_process_group(
                backend=pg_backend,
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        self.group = dist.group.WORLD

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.clone()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
