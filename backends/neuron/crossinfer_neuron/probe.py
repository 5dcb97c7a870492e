"""Finding torch-neuronx and the Neuron devices without starting the Neuron runtime.

torch-neuronx ships from the AWS Neuron repository only. PyPI's packages under the Neuron
names are placeholders: a lone ``__init__.py`` that raises ``ImportError("WRONG PACKAGE ...")``
on import. They are recognised here by their shape (no module beside ``__init__``), so
discovery reports them instead of importing them.
"""

from __future__ import annotations

import glob
import importlib.util
import os

NEURON_INDEX = "https://pip.repos.neuron.amazonaws.com"
INSTALL = f"pip install --extra-index-url {NEURON_INDEX} torch-neuronx neuronx-cc"


def is_placeholder(package: str) -> bool:
    """True when ``package`` is installed as a module-less stub (PyPI's Neuron placeholders)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return False
    for location in spec.submodule_search_locations:
        for entry in os.listdir(location):
            if entry not in ("__init__.py", "__pycache__"):
                return False
    return True


def torch_neuronx_problem() -> str:
    """Why torch-neuronx cannot be used here; "" when it is the real package."""
    if importlib.util.find_spec("torch_neuronx") is None:
        return (
            "torch-neuronx is not installed; it comes from the AWS Neuron repository, not PyPI "
            f"({INSTALL})"
        )
    if is_placeholder("torch_neuronx"):
        return (
            "the torch-neuronx installed is PyPI's placeholder (importing it raises "
            "'WRONG PACKAGE'); uninstall it and install it from the AWS Neuron repository "
            f"({INSTALL})"
        )
    return ""


def neuron_device_files() -> list[str]:
    """The Neuron devices' nodes (``/dev/neuron0`` ...), one per chip."""
    return sorted(glob.glob("/dev/neuron[0-9]*"), key=lambda p: int(p[len("/dev/neuron") :]))
