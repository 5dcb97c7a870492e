"""Tensor-parallel ranks read only their slices: through ``safe_open(...).get_slice`` for
safetensors (no whole tensor is read), after dequantising for GGUF; either way a rank's part
equals the slice of the whole tensor, and the parts of all ranks add up to about 1/N of it."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import crossinfer.loader.hf_folder as hf_folder
from crossinfer.distributed.tensor_parallel import TensorParallel
from crossinfer.loader import open_model
from crossinfer.models.shards import RankShards, narrow
from crossinfer_conformance.checks.tiny_model import build_tiny_model


def _shards(files: Any, rank: int, size: int) -> RankShards:
    c = files.config
    return RankShards.build(
        TensorParallel(rank, size),
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("slices"), head_size=16, seed=3)


def test_safetensors_parts_are_read_without_the_whole_tensor(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = open_model(str(folder))
    whole = dict(files.iter_weights())
    opened = hf_folder._open_safetensors

    class NoWholeReads:
        def __init__(self, reader: Any) -> None:
            self._reader = reader

        def get_tensor(self, name: str) -> Any:
            raise AssertionError(f"{name} was read whole")

        def get_slice(self, name: str) -> Any:
            return self._reader.get_slice(name)

    @contextmanager
    def guarded(path: str) -> Any:
        with opened(path) as reader:
            yield NoWholeReads(reader)

    monkeypatch.setattr(hf_folder, "_open_safetensors", guarded)
    read = 0
    for rank in range(2):
        shards = _shards(files, rank, 2)
        parts = dict(files.iter_weights(select=shards.select))
        _check_parts(whole.items(), parts, shards)
        read += sum(t.numel() for t in parts.values())
    total = sum(t.numel() for t in whole.values())
    # One KV head (replicated on both ranks) and the norms are whole on each; the rest halves.
    assert read < 1.2 * total


def test_gguf_parts_equal_the_slices_of_the_whole_tensors() -> None:
    files = open_model(None)  # the embedded SmolLM2 GGUF: 9 heads, 3 KV heads
    shards = _shards(files, 1, 3)
    parts = dict(files.iter_weights(select=shards.select))
    assert _check_parts(files.iter_weights(), parts, shards) == len(parts) > 100


def _check_parts(whole: Iterable[tuple[str, torch.Tensor]], parts: dict[str, torch.Tensor],
                 shards: RankShards) -> int:  # fmt: skip
    """Each part equals the slice of the whole tensor; returns how many were compared."""
    checked = 0
    for name, tensor in whole:
        part = shards.select(name, tensor.shape)
        if part is None:
            assert name not in parts
            continue
        assert torch.equal(parts[name], narrow(tensor, part)), name
        checked += 1
    return checked
