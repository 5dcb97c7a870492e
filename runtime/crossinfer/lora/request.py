"""Which adapter a request runs under (vLLM's ``LoRARequest``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter folder under a name. ``lora_int_id`` is the adapter's identity inside
    the engine (device slots, prefix-cache hashes): two requests with the same id share an
    adapter, so a different adapter needs a different id."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be at least 1, got {self.lora_int_id}")
