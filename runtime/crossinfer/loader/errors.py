"""The one error the loader raises for a path or file it cannot load."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model path or file that cannot be loaded; the message names the file and the problem."""
