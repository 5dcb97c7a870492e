"""LoRA adapters served beside the base model: requests name one (``LoRARequest``), the engine
loads PEFT folders (adapter.py), keeps the resident ones in device slots (slots.py,
manager.py) and runs them batched through ``crossinfer.layers.lora``."""

from crossinfer.lora.request import LoRARequest

__all__ = ["LoRARequest"]
