"""What the CPU backend does to a loaded model: swap its layers for the CPU's faster ones.

Linear layers become :class:`CpuLinear` (always); RMSNorm, rotary and SiLU-and-multiply become
their native versions when the native kernels could be built (``native.library()``). The model
file stays plain, and every swapped layer computes what the layer it replaces computes.
"""

from __future__ import annotations

import ctypes

from torch import nn

from crossinfer.layers.activation import SiluAndMul
from crossinfer.layers.norm import RMSNorm
from crossinfer.layers.rotary import Rotate
from crossinfer_cpu import native
from crossinfer_cpu.linear import CpuLinear
from crossinfer_cpu.pointwise import CpuRMSNorm, CpuRotate, CpuSiluAndMul


def prepare_layers(model: nn.Module) -> nn.Module:
    """Replace the layers of ``model`` in place, at any depth; returns the model."""
    lib = native.library()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            replacement = _replacement(child, lib)
            if replacement is not None:
                setattr(module, name, replacement)
    return model


def _replacement(layer: nn.Module, lib: ctypes.CDLL | None) -> nn.Module | None:
    if isinstance(layer, nn.Linear):
        return CpuLinear(layer)
    if lib is None:
        return None
    if type(layer) is RMSNorm:
        return CpuRMSNorm(layer, lib)
    if type(layer) is Rotate:
        return CpuRotate(lib)
    if type(layer) is SiluAndMul:
        return CpuSiluAndMul(lib)
    return None
