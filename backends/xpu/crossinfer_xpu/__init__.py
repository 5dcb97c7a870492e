"""crossinfer backend for Intel GPUs (Data Center GPU Max, Flex, Arc): the shared Triton
kernels of crossinfer_triton on torch.xpu, collectives through torch.distributed's xccl."""

from crossinfer_xpu.backend import XpuBackend

__all__ = ["XpuBackend"]
