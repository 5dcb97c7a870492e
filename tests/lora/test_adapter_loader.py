"""What the adapter loader refuses, each with the file and the reason; and the scale it
applies (alpha / r, rsLoRA's alpha / sqrt(r))."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from crossinfer.distributed.tensor_parallel import TensorParallel
from crossinfer.lora.adapter import AdapterError, load_adapter
from crossinfer.lora.request import LoRARequest
from crossinfer.models.llama import LlamaArgs
from crossinfer.models.shards import RankShards
from tests.lora.conftest import Adapters

WEIGHTS = "adapter_model.safetensors"


def _load(adapters: Adapters, folder: Path, max_rank: int = 16) -> Any:
    args = LlamaArgs.from_config(AutoConfig.from_pretrained(adapters.base))
    shards = RankShards.build(
        TensorParallel(), args.num_heads, args.num_kv_heads, args.head_dim,
        args.intermediate_size, args.vocab_size,
    )  # fmt: skip
    return load_adapter(LoRARequest("x", 1, str(folder)), args, shards, max_rank, torch.float32)


def _edited(
    adapters: Adapters, tmp_path: Path, config: dict[str, Any] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Path:  # fmt: skip
    folder = tmp_path / "edited"
    shutil.copytree(adapters.folders["qv"], folder)
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        save_file(tensors(load_file(folder / WEIGHTS)), folder / WEIGHTS)
    return folder


def _renamed(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


REFUSALS: dict[str, tuple[dict[str, Any], Any, str]] = {
    "dora": ({"use_dora": True}, None, "use_dora is set; DoRA adapters are not supported"),
    "bias": ({"bias": "all"}, None, "bias 'all'; only adapters without trained biases"),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    "embedding-target": ({"target_modules": ["embed_tokens"]}, None, "the embedding or the LM"),
    "unknown-target": ({"target_modules": ["q_proj", "fc1"]}, None, "unknown target module 'fc1'"),
    "rank-over-max": ({"r": 32}, None, "rank 32 is over the engine's maximum LoRA rank 16"),
    "rank-pattern": ({"rank_pattern": {"q_proj": 2}}, None, "per-module ranks"),
    "unknown-tensor": ({}, _renamed("q_proj", "fc1"), "unknown module 'fc1'"),
    "embedding-tensor": (
        {},
        lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 256)},
        "embedding or LM-head targets are not supported",
    ),
    "another-base-model": (
        {},
        lambda t: {k: torch.ones(v.shape[0], 48) if "lora_A" in k else v for k, v in t.items()},
        "do not fit the base model's 64 -> 64 projection; is the adapter for another base model",
    ),
    "too-many-layers": ({}, _renamed("layers.1.", "layers.5."), "the base model has 2 layers"),
    "half-missing": (
        {},
        lambda t: {k: v for k, v in t.items() if "q_proj.lora_B" not in k},
        "q_proj has lora_A only",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_file_and_the_reason(
    case: str, adapters: Adapters, tmp_path: Path
) -> None:
    config, tensors, reason = REFUSALS[case]
    folder = _edited(adapters, tmp_path, config, tensors)
    with pytest.raises(AdapterError) as info:
        _load(adapters, folder)
    assert reason in str(info.value)
    assert str(folder) in str(info.value)


def test_missing_files_and_folders(adapters: Adapters, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="is not a folder"):
        _load(adapters, tmp_path / "nowhere")
    folder = _edited(adapters, tmp_path)
    (folder / WEIGHTS).unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: missing"):
        _load(adapters, folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        _load(adapters, folder)


def test_scale_is_alpha_over_rank_or_its_root(adapters: Adapters) -> None:
    plain, rs = _load(adapters, adapters.folders["qv"]), _load(adapters, adapters.folders["rs"])
    assert (plain.rank, plain.scale) == (4, 8 / 4)
    assert (rs.rank, rs.scale) == (16, 4 / math.sqrt(16))
    # q and v are targeted, k is not: one fused layer, its k segment empty
    q, k, v = plain.layers[(0, "self_attn.qkv_proj")]
    assert q is not None and v is not None and k is None
    raw = load_file(adapters.folders["qv"] / WEIGHTS)
    b = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(q[1], b * 2.0)
