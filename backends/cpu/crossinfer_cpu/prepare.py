"""What the CPU backend does to a loaded model: swap its layers for the CPU's faster ones.

With ``--quantization int8`` every linear layer first becomes an :class:`Int8Linear`
(``quantize_layers``). Linear layers still plain then become :class:`CpuLinear`; RMSNorm,
rotary and SiLU-and-multiply become their native versions when the native kernels could be
built (``native.library()``). The model file stays plain, and every swapped layer computes
what the layer it replaces computes (int8: to int8 rounding).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from torch import nn

from crossinfer.layers.activation import SiluAndMul
from crossinfer.layers.norm import RMSNorm
from crossinfer.layers.rotary import Rotate
from crossinfer_cpu import native
from crossinfer_cpu.int8 import Int8Linear
from crossinfer_cpu.linear import CpuLinear
from crossinfer_cpu.pointwise import CpuRMSNorm, CpuRotate, CpuSiluAndMul


def prepare_layers(model: nn.Module) -> nn.Module:
    """Replace the layers of ``model`` in place, at any depth; returns the model."""
    lib = native.library()
    return _swap(model, lambda layer: _replacement(layer, lib))


def quantize_layers(model: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` becomes an int8 layer, in place; returns the model."""
    lib = native.library()
    return _swap(
        model, lambda layer: Int8Linear(layer, lib) if isinstance(layer, nn.Linear) else None
    )


def _swap(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(module, name, new)
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
