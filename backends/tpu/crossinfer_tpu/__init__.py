"""crossinfer backend for Google TPUs: the shared XLA base (crossinfer_xla) with TPU buckets,
the ragged-paged-attention cache layout and Pallas' ragged paged attention kernel."""

from crossinfer_tpu.backend import TpuBackend

__all__ = ["TpuBackend"]
