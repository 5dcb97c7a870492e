"""Fixtures shared across test folders: the embedded SmolLM2 model, loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CROSSINFER_NO_PROGRESS", "1")
# The emulated cuda and rocm backends run their Triton kernels in Triton's interpreter, which
# must be chosen before anything (transformers does) imports triton.language.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_loaded():  # -> crossinfer.engine.setup.LoadedModel
    """SmolLM2-135M-Instruct from the packaged GGUF, on the CPU backend, fp32."""
    from crossinfer.engine.setup import EngineConfig, load_model

    return load_model(EngineConfig(device="cpu"))
