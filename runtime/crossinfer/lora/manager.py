"""One model's adapters: its LoRA layers, the adapters kept in host memory, and the device
slots; before each step, the step's token -> slot map.

``attach`` wraps q/k/v, o, gate/up and down of every decoder layer in a ``LoRALinear`` after
the weights load and before a backend quantises or swaps layers, so the base linear inside is
swapped like any other (int8 base weights, the update in the activation dtype). A
tensor-parallel row-parallel layer is wrapped inside, around its shard, so the update is part
of the partial sum the all-reduce adds up.

Adapters are read (and checked) once and kept in host memory, the least recently used
dropped beyond ``max_cpu_loras`` (read again from their folder when next needed); at most
``max_loras`` are resident in device slots (slots.py). Each tensor-parallel rank has its own
manager, reads its own slices, and places adapters by the same calls in the same order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from crossinfer.layers.lora import LoRALinear, LoRAMapping, LoRAState, Rows
from crossinfer.layers.parallel import RowParallelLinear
from crossinfer.lora.adapter import Adapter, load_adapter
from crossinfer.lora.request import LoRARequest
from crossinfer.lora.slots import SlotTable
from crossinfer.models.llama import LlamaForCausalLM

Span = tuple[LoRARequest | None, int]  # one chunk of a step: its adapter, its token count


@dataclass(frozen=True)
class LoRAConfig:
    """How many adapters, how large (vLLM's flags and defaults)."""

    max_loras: int = 1
    """Adapters resident on the device at once, and so in one step."""
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    """Adapters kept in host memory; None: ``max_loras``."""

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("--max-loras and --max-lora-rank must be at least 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"--max-cpu-loras {self.max_cpu_loras} must be at least --max-loras "
                f"{self.max_loras}"
            )


class LoRAManager:
    """The LoRA layers of one model (attached at construction) and its adapters."""

    def __init__(self, model: LlamaForCausalLM, config: LoRAConfig) -> None:
        self.config = config
        self.args = model.args
        self.shards = model.shards
        self.dtype = model.dtype
        self.state = LoRAState()
        self.layers = attach(model, config, self.state)
        self.slots = SlotTable(config.max_loras)
        self._host: OrderedDict[int, Adapter] = OrderedDict()

    @property
    def max_cpu_loras(self) -> int:
        return self.config.max_cpu_loras or self.config.max_loras

    def add(self, request: LoRARequest) -> Adapter:
        """The adapter's weights, read and checked now unless held in host memory already;
        raises AdapterError (a ValueError) when the folder cannot run on this model."""
        adapter = self._host.get(request.lora_int_id)
        if adapter is not None:
            self._host.move_to_end(request.lora_int_id)
            return adapter
        adapter = load_adapter(
            request, self.args, self.shards, self.config.max_lora_rank, self.dtype
        )
        self._host[request.lora_int_id] = adapter
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Drop an adapter from host memory; False if it was not there. Its device slot is
        left to be reused, so that every rank's slots stay the same."""
        return self._host.pop(lora_int_id, None) is not None

    def prepare(self, spans: Sequence[Span], device: torch.device) -> None:
        """Place the step's adapters in slots (writing the new ones) and set the layers'
        token -> slot map. ``spans``: the step's chunks in batch order."""
        requests = {lora.lora_int_id: lora for lora, _ in spans if lora is not None}
        if not requests:
            self.state.mapping = None
            return
        # Read what is missing before any slot changes, so a bad folder leaves them as they were.
        missing = {i: self.add(r) for i, r in requests.items() if self.slots.slot_of(i) is None}
        slots, loads = self.slots.assign(list(requests))
        for slot, lora_id in loads:
            self._write(slot, missing[lora_id])
        token_slots: list[int] = []
        ranges: dict[int, list[tuple[int, int]]] = {}
        for lora, num_tokens in spans:
            slot = -1 if lora is None else slots[lora.lora_int_id]
            start = len(token_slots)
            token_slots += [slot] * num_tokens
            if slot < 0 or num_tokens == 0:
                continue
            own = ranges.setdefault(slot, [])
            if own and own[-1][1] == start:  # adjacent chunks of one adapter: one range
                own[-1] = (own[-1][0], start + num_tokens)
            else:
                own.append((start, start + num_tokens))
        groups = tuple((slot, _rows(own, device)) for slot, own in ranges.items())
        self.state.mapping = LoRAMapping(
            torch.tensor(token_slots, dtype=torch.int64, device=device), groups
        )

    def _write(self, slot: int, adapter: Adapter) -> None:
        for key, layer in self.layers.items():
            weights = adapter.layers.get(key, (None,) * len(layer.segments))
            layer.set_slot(slot, weights)


def _rows(ranges: list[tuple[int, int]], device: torch.device) -> Rows:
    if len(ranges) == 1:
        return slice(*ranges[0])
    return torch.cat([torch.arange(s, e, device=device) for s, e in ranges])


def attach(
    model: LlamaForCausalLM, config: LoRAConfig, state: LoRAState
) -> dict[tuple[int, str], LoRALinear]:
    """Wrap every decoder layer's projections in place; returns them by (layer, module)."""
    shards = model.shards
    q, kv, mlp = shards.q[1], shards.kv[1], shards.mlp[1]
    hidden = model.args.hidden_size
    layers: dict[tuple[int, str], LoRALinear] = {}
    for index, decoder in enumerate(model.layers):
        for group, name, segments in (
            ("self_attn", "qkv_proj", (q, kv, kv)),
            ("self_attn", "o_proj", (hidden,)),
            ("mlp", "gate_up_proj", (mlp, mlp)),
            ("mlp", "down_proj", (hidden,)),
        ):
            parent = decoder.get_submodule(group)
            layers[(index, f"{group}.{name}")] = _wrap(parent, name, segments, config, state)
    return layers


def _wrap(
    parent: nn.Module, name: str, segments: tuple[int, ...], config: LoRAConfig, state: LoRAState
) -> LoRALinear:
    child = parent.get_submodule(name)
    if isinstance(child, RowParallelLinear):  # the update joins the partial sum
        parent, name, child = child, "inner", child.inner
    if not isinstance(child, nn.Linear):
        raise ValueError(f"LoRA wraps plain linear layers, not {type(child).__name__}")
    layer = LoRALinear(child, segments, config.max_loras, config.max_lora_rank, state)
    setattr(parent, name, layer)
    return layer
