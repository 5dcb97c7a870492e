"""The rocm backend: AMD GPUs through the ROCm (HIP) build of torch, Triton kernels, RCCL."""

from crossinfer_rocm.backend import RocmBackend

__all__ = ["RocmBackend"]
