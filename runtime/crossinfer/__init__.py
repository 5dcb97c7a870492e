"""crossinfer: an LLM inference runtime with pluggable hardware backends."""

from crossinfer.backend import CONTRACT_VERSION

__version__ = "0.1.0"

__all__ = ["CONTRACT_VERSION", "__version__"]
