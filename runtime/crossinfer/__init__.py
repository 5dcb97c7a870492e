"""crossinfer: an LLM inference runtime with pluggable hardware backends.

``from crossinfer import LLM, SamplingParams, LoRARequest`` is the offline API. The heavy
parts (models, transformers) are imported on first use, so ``import crossinfer`` stays cheap
for tools that only need the Backend contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crossinfer.backend import CONTRACT_VERSION

if TYPE_CHECKING:
    from crossinfer.llm import LLM
    from crossinfer.lora.request import LoRARequest
    from crossinfer.sampling_params import SamplingParams
    from crossinfer.structured_outputs import StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "CONTRACT_VERSION",
    "LLM",
    "LoRARequest",
    "SamplingParams",
    "StructuredOutputsParams",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from crossinfer.llm import LLM

        return LLM
    if name == "LoRARequest":
        from crossinfer.lora.request import LoRARequest

        return LoRARequest
    if name == "SamplingParams":
        from crossinfer.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from crossinfer.structured_outputs import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(f"module 'crossinfer' has no attribute {name!r}")
