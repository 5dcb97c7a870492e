"""What crossinfer's torch-xla backends share (no backend of its own): the reference
static-shape ops (``static_ops``, plain torch, also usable without torch_xla) and
:class:`XlaBackend`, the base of crossinfer_tpu and crossinfer_neuron."""

from crossinfer_xla.backend import XlaBackend
from crossinfer_xla.static_ops import SPLIT, KVLayout

__all__ = ["SPLIT", "KVLayout", "XlaBackend"]
