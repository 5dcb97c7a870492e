"""The LoRA adapters a server offers by name: the ``model`` a request names (or TGI's
``adapter_id``), each with the engine's id for it. The engine holds the weights; this table is
the API server's view, changed only after the engine has accepted or dropped an adapter."""

from __future__ import annotations

import itertools
import json

from crossinfer.lora.request import LoRARequest


def parse_lora_module(text: str) -> tuple[str, str]:
    """``--lora-modules`` entry: ``name=path`` or vLLM's JSON ``{"name": ..., "path": ...}``."""
    if text.lstrip().startswith("{"):
        try:
            entry = json.loads(text)
            name, path = entry["name"], entry["path"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f'--lora-modules {text!r}: expected {{"name": ..., "path": ...}}'
            ) from exc
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise ValueError(f"--lora-modules {text!r}: expected NAME=PATH")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise ValueError(f"--lora-modules {text!r}: the name and the path must be non-empty text")
    return name, path


class ServedAdapters:
    """Adapter name -> ``LoRARequest``; ids count up and are never reused, so an adapter
    loaded again under a name never meets the cached blocks or slot of the one before.
    Event-loop only."""

    def __init__(self) -> None:
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def get(self, name: str) -> LoRARequest | None:
        return self._by_name.get(name)

    def new(self, name: str, path: str) -> LoRARequest:
        """A request for a new adapter (not yet added: see ``add``)."""
        return LoRARequest(name, next(self._ids), path)

    def add(self, lora: LoRARequest) -> None:
        self._by_name[lora.lora_name] = lora

    def remove(self, name: str) -> LoRARequest | None:
        return self._by_name.pop(name, None)

    def all(self) -> list[LoRARequest]:
        return list(self._by_name.values())
