"""One tiny base model and its three adapters (with their reference tokens) per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.lora.adapters import ADAPTERS, greedy, make_adapter, tiny_llama


@dataclass(frozen=True)
class Adapters:
    base: Path  # the base model's folder
    folders: dict[str, Path]  # adapter name -> PEFT folder
    expected: dict[str | None, list[list[int]]]  # adapter name (None: base) -> greedy tokens


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama(root)
    expected: dict[str | None, list[list[int]]] = {
        None: greedy(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    }
    folders = {}
    for seed, (name, lora) in enumerate(ADAPTERS.items(), start=10):
        folders[name] = root / name
        expected[name] = make_adapter(base, folders[name], seed, **lora)
    for name in ADAPTERS:  # each adapter changes the tokens: the comparison can fail
        assert expected[name] != expected[None], name
    return Adapters(base, folders, expected)
