"""Portable Triton kernels and the backend base class shared by the GPU backends.

``crossinfer_triton`` registers no backend itself: ``crossinfer_cuda`` and ``crossinfer_rocm``
subclass :class:`TritonBackend` and add what differs per vendor (probe, memory, collectives,
capabilities, launch tiles). Kernels: ``cache_ops`` (write_kv, copy_blocks) and
``paged_attention`` (ragged paged attention with online softmax, GQA, split-K decode).
"""

from crossinfer_triton.backend import TritonBackend, emulation_requested
from crossinfer_triton.tiles import AttentionTiles

__all__ = ["AttentionTiles", "TritonBackend"]

emulation_requested()  # before anything imports triton.language, when emulation is asked for
