"""The CPU reference backend: the whole contract in plain PyTorch, and the oracle every other
backend is checked against."""

from crossinfer_cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
