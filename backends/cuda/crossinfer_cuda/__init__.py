"""The cuda backend: NVIDIA GPUs through the CUDA build of torch, Triton kernels, NCCL."""

from crossinfer_cuda.backend import CudaBackend

__all__ = ["CudaBackend"]
