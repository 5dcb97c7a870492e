"""Reading a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for one model,
checked against it, as this tensor-parallel rank's slices.

PEFT names its tensors ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``
(A: ``[r, in]``) and ``...lora_B.weight`` (B: ``[out, r]``); the update is ``B @ A @ x`` times
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). The model fuses q/k/v into
``qkv_proj`` and gate/up into ``gate_up_proj``, so each PEFT module maps onto a segment of a
fused layer. Under tensor parallelism the update splits as the base layer does: a
column-parallel layer (q/k/v, gate/up) keeps A whole and takes B's rows of this rank's
outputs; a row-parallel layer (o, down) takes A's columns of this rank's inputs and keeps B
whole, so its partial update joins the partial sum before the existing all-reduce.

What the model cannot run is refused naming the file and the reason: DoRA, trained biases,
``modules_to_save``, embedding or LM-head targets, per-module rank or alpha patterns, a rank
over ``--max-lora-rank``, unknown modules, and tensors whose shapes are not this model's (an
adapter for another base model).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from crossinfer.lora.request import LoRARequest
from crossinfer.models.llama import LlamaArgs
from crossinfer.models.shards import RankShards, narrow

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT module -> (the model's layer, segment of it, number of segments)
MODULES = {
    "q_proj": ("self_attn.qkv_proj", 0, 3),
    "k_proj": ("self_attn.qkv_proj", 1, 3),
    "v_proj": ("self_attn.qkv_proj", 2, 3),
    "o_proj": ("self_attn.o_proj", 0, 1),
    "gate_proj": ("mlp.gate_up_proj", 0, 2),
    "up_proj": ("mlp.gate_up_proj", 1, 2),
    "down_proj": ("mlp.down_proj", 0, 1),
}
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})
_NOT_LINEAR = frozenset({"embed_tokens", "lm_head"})
_UNSUPPORTED = {  # config keys whose adapters compute something else than B @ A @ x
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on parameters (rather than modules)",
}
_TENSOR = re.compile(
    r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight"
)

SegmentWeights = tuple[torch.Tensor, torch.Tensor]  # A [r, in], B [out, r] (scaled)


class AdapterError(ValueError):
    """An adapter folder this model cannot run; the message names the file and why."""


@dataclass(frozen=True)
class Adapter:
    """One adapter's weights for this rank, by the model's layers."""

    request: LoRARequest
    rank: int
    scale: float
    layers: dict[tuple[int, str], tuple[SegmentWeights | None, ...]]
    """(decoder layer, module such as ``self_attn.qkv_proj``) -> per segment, or None."""


def load_adapter(
    request: LoRARequest, args: LlamaArgs, shards: RankShards, max_rank: int, dtype: torch.dtype
) -> Adapter:
    """Read and check ``request.lora_path``; raises AdapterError with the reason."""
    folder = Path(request.lora_path)
    if not folder.is_dir():
        raise AdapterError(f"LoRA adapter {request.lora_name!r}: {folder} is not a folder")
    config = _read_config(folder / CONFIG_FILE)
    rank, scale = _check_config(folder / CONFIG_FILE, config, max_rank)
    tensors = _read_tensors(folder, args)
    layers: dict[tuple[int, str], list[SegmentWeights | None]] = {}
    for (layer, module), (a, b) in sorted(tensors.items()):
        where = f"{folder / WEIGHTS_FILE}: layers.{layer} {module}"
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"{where} has rank {a.shape[0]} (A) / {b.shape[1]} (B); adapter_config.json "
                f"says r={rank}"
            )
        a, b = _this_rank(module, layer, a, b, shards)
        target, segment, count = MODULES[module]
        entry = layers.setdefault((layer, target), [None] * count)
        entry[segment] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    if not layers:
        raise AdapterError(f"{folder / WEIGHTS_FILE}: no LoRA tensors of the model's layers")
    return Adapter(request, rank, scale, {key: tuple(v) for key, v in layers.items()})


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path}: missing; a PEFT LoRA folder has one (save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return config


def _check_config(path: Path, config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    """The rank and the scale, after refusing what is not supported."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type!r}; only LORA adapters are supported")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: use_dora is set; DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{path}: bias {config['bias']!r}; only adapters without trained biases ('none') "
            "are supported"
        )
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{path}: modules_to_save {config['modules_to_save']}; adapters that replace whole "
            "modules are not supported"
        )
    if config.get("lora_bias"):
        raise AdapterError(f"{path}: lora_bias is set; LoRA biases are not supported")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{path}: {key} is set; {what} are not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        _check_targets(path, targets)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{path}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterError(
            f"{path}: rank {rank} is over the engine's maximum LoRA rank {max_rank}; restart it "
            f"with --max-lora-rank {rank} or more"
        )
    if not isinstance(alpha, int | float):
        raise AdapterError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scale)


def _check_targets(path: Path, targets: list[Any]) -> None:
    for target in targets:  # PEFT matches by suffix: "q_proj" or "model.layers.0.self_attn.q_proj"
        name = str(target).rsplit(".", 1)[-1]
        if name in _NOT_LINEAR:
            raise AdapterError(
                f"{path}: target module {name!r}; LoRA on the embedding or the LM head is not "
                "supported"
            )
        if name not in MODULES:
            raise AdapterError(
                f"{path}: unknown target module {name!r}; supported: {', '.join(MODULES)}"
            )


def _read_tensors(
    folder: Path, args: LlamaArgs
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, PEFT module) -> (A, B), whole, with shapes checked against the model."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        found = (
            "adapter_model.bin (a pickle, not read)"
            if (folder / "adapter_model.bin").exists()
            else "nothing"
        )
        raise AdapterError(
            f"{path}: missing (found {found}); save the adapter with safe_serialization=True"
        )
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():
                match = _TENSOR.fullmatch(name)
                if match is None:
                    why = (
                        "embedding or LM-head targets are not supported"
                        if any(m in name for m in _NOT_LINEAR)
                        else "not a LoRA tensor of the model's decoder layers"
                    )
                    raise AdapterError(f"{path}: tensor {name!r}: {why}")
                layer, _, module, half = match.groups()
                if module not in MODULES:
                    raise AdapterError(
                        f"{path}: tensor {name!r}: unknown module {module!r}; supported: "
                        f"{', '.join(MODULES)}"
                    )
                halves.setdefault((int(layer), module), {})[half] = file.get_tensor(name)
    except AdapterError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from exc
    tensors = {}
    for (layer, module), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: layers.{layer} {module} has lora_{''.join(pair)} only")
        _check_shapes(path, layer, module, pair["A"], pair["B"], args)
        tensors[(layer, module)] = (pair["A"], pair["B"])
    return tensors


def _check_shapes(
    path: Path, layer: int, module: str, a: torch.Tensor, b: torch.Tensor, args: LlamaArgs
) -> None:
    if layer >= args.num_layers:
        raise AdapterError(
            f"{path}: layers.{layer} {module}: the base model has {args.num_layers} layers; "
            "is the adapter for another base model?"
        )
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    hidden, mlp = args.hidden_size, args.intermediate_size
    in_out = {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, mlp),
        "up_proj": (hidden, mlp),
        "down_proj": (mlp, hidden),
    }[module]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_out[0] or b.shape[0] != in_out[1]:
        raise AdapterError(
            f"{path}: layers.{layer} {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not "
            f"fit the base model's {in_out[0]} -> {in_out[1]} projection; is the adapter for "
            "another base model?"
        )


def _this_rank(
    module: str, layer: int, a: torch.Tensor, b: torch.Tensor, shards: RankShards
) -> SegmentWeights:
    """The rank's part, cut where the base layer's weight is cut: B's output rows of a
    column-parallel layer, A's input columns of a row-parallel one."""
    group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    part = shards.select(f"layers.{layer}.{group}.{module}.weight", (b.shape[0], a.shape[1]))
    assert part is not None  # every rank holds part of every projection
    if module in ROW_PARALLEL:
        return narrow(a, part), b  # part: (1, first input column, columns)
    return a, narrow(b, part)  # part: (0, first output row, rows)
