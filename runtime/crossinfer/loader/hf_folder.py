"""A Hugging Face model folder: config.json plus one or more safetensors files."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from crossinfer.loader.errors import ModelLoadError

if TYPE_CHECKING:
    from crossinfer.loader.model_files import Selector
from crossinfer.loader.tokenizer import load_folder_tokenizer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class SafetensorsShard:
    """One safetensors file and the tensors to read from it, in file order."""

    path: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class HFFolderSource:
    """Reads a folder's safetensors lazily: one file open at a time, one tensor at a time."""

    folder: str
    config: PretrainedConfig
    shards: tuple[SafetensorsShard, ...]

    @property
    def num_tensors(self) -> int:
        """How many tensors iter_tensors yields, over all shards."""
        return sum(len(shard.names) for shard in self.shards)

    def iter_tensors(self, select: Selector | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield each tensor with its stored name and dtype; with ``select``, read only the
        selected part of each (``get_slice``: the other bytes are never read)."""
        for shard in self.shards:
            with _open_safetensors(shard.path) as reader:
                for name in shard.names:
                    if select is None:
                        yield name, reader.get_tensor(name)
                        continue
                    lazy = reader.get_slice(name)
                    shape = lazy.get_shape()
                    part = select(name, shape)
                    if part is None:
                        continue
                    if not shape:  # a 0-d tensor is whole
                        yield name, reader.get_tensor(name)
                        continue
                    dim, start, length = part
                    index = (slice(None),) * dim + (slice(start, start + length),)
                    yield name, lazy[index]

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer saved in the folder."""
        return load_folder_tokenizer(self.folder)


def open_hf_folder(folder: str) -> HFFolderSource:
    """Read a folder's config and safetensors headers; weights are read later.

    Raises ModelLoadError for a missing config.json, no safetensors files, an index naming a
    missing shard, or a file that is not a complete safetensors file.
    """
    config = _read_config(folder)
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        shards = _shards_from_index(index_path)
    else:
        shards = _shards_from_glob(folder)
    return HFFolderSource(folder=folder, config=config, shards=shards)


def _read_config(folder: str) -> PretrainedConfig:
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        gguf_files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        hint = (
            f"; to load a GGUF file, pass the file itself, e.g. {gguf_files[0]}"
            if gguf_files
            else ""
        )
        raise ModelLoadError(
            f"{config_path}: not found; a Hugging Face model folder needs config.json "
            f"beside its *.safetensors files{hint}"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{config_path}: cannot read the model config: {exc}") from exc
    return config


def _shards_from_glob(folder: str) -> tuple[SafetensorsShard, ...]:
    paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not paths:
        raise ModelLoadError(
            f"{folder}: no *.safetensors files in this folder; crossinfer reads safetensors "
            f"weights only (convert .bin / .pt checkpoints with safetensors first)"
        )
    shards = tuple(SafetensorsShard(path, _tensor_names(path)) for path in paths)
    seen: dict[str, str] = {}
    for shard in shards:
        for name in shard.names:
            if name in seen:
                # Without an index, two files holding one name means two copies of the model
                # (e.g. a consolidated file beside the shards) and no way to tell which is meant.
                raise ModelLoadError(
                    f"{shard.path}: tensor {name} is also in {seen[name]}; add "
                    f"{INDEX_FILE} or remove the duplicate file"
                )
            seen[name] = shard.path
    return shards


def _shards_from_index(index_path: str) -> tuple[SafetensorsShard, ...]:
    weight_map = _read_weight_map(index_path)
    folder = os.path.dirname(index_path)
    names_by_file: dict[str, set[str]] = {}
    for name, file_name in weight_map.items():
        names_by_file.setdefault(file_name, set()).add(name)
    shards = []
    for file_name in sorted(names_by_file):
        path = os.path.join(folder, file_name)
        if not os.path.isfile(path):
            raise ModelLoadError(
                f"{path}: missing; {INDEX_FILE} maps tensors to this shard — download it again"
            )
        wanted = names_by_file[file_name]
        stored = _tensor_names(path)
        missing = sorted(wanted.difference(stored))
        if missing:
            raise ModelLoadError(
                f"{path}: lacks tensors that {INDEX_FILE} puts in it, e.g. {missing[0]} "
                f"({len(missing)} in all)"
            )
        shards.append(SafetensorsShard(path, tuple(n for n in stored if n in wanted)))
    return tuple(shards)


def _read_weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index_path}: not a valid safetensors index: {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_path}: weight_map is empty or not an object")
    return {str(name): str(file_name) for name, file_name in weight_map.items()}


def _tensor_names(path: str) -> tuple[str, ...]:
    # Opening checks the header against the file size, so a truncated file fails here,
    # before any weight is read, rather than halfway through loading.
    with _open_safetensors(path) as reader:
        return tuple(reader.keys())


def _open_safetensors(path: str) -> safe_open:
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(
            f"{path}: not a complete safetensors file ({exc}); it may be truncated — "
            f"download it again"
        ) from exc
