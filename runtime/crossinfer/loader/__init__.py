"""Model loading: Hugging Face folders (safetensors) and GGUF files, weights and tokenizer.

``open_model(path)`` reads headers and metadata only and returns a ``ModelFiles`` whose
``iter_weights()`` yields HF-named float tensors one at a time.
"""

from __future__ import annotations

from crossinfer.loader.default_model import default_model_path
from crossinfer.loader.errors import ModelLoadError
from crossinfer.loader.model_files import ModelFiles, open_model

__all__ = ["ModelFiles", "ModelLoadError", "default_model_path", "open_model"]
