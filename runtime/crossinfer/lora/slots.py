"""Which adapter sits in which device slot: pure bookkeeping, least recently used first out.

A step may run at most ``num_slots`` distinct adapters (the scheduler sees to it). Before the
step the runner asks for their slots; adapters already resident keep theirs, the others take
a free slot or the one of the adapter least recently used that this step does not need. Every
tensor-parallel rank keeps its own table and makes the same calls in the same order, so the
tables agree without being sent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class SlotTable:
    """Adapter ids (``lora_int_id``) -> slots ``0 .. num_slots - 1``, in LRU order."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"max_loras must be at least 1, got {num_slots}")
        self.num_slots = num_slots
        self._resident: OrderedDict[int, int] = OrderedDict()  # oldest use first

    def slot_of(self, lora_id: int) -> int | None:
        return self._resident.get(lora_id)

    @property
    def resident(self) -> list[int]:
        """The resident adapter ids, least recently used first."""
        return list(self._resident)

    def assign(self, lora_ids: Sequence[int]) -> tuple[dict[int, int], list[tuple[int, int]]]:
        """Slots for one step's adapters, and the (slot, adapter id) pairs whose weights must
        be written first (newly placed, possibly over an evicted adapter)."""
        wanted = list(dict.fromkeys(lora_ids))
        if len(wanted) > self.num_slots:
            raise ValueError(f"a step holds {len(wanted)} adapters; max_loras is {self.num_slots}")
        for lora_id in wanted:  # in use now: the most recently used
            if lora_id in self._resident:
                self._resident.move_to_end(lora_id)
        loads = []
        for lora_id in wanted:
            if lora_id in self._resident:
                continue
            if len(self._resident) < self.num_slots:
                slot = min(set(range(self.num_slots)) - set(self._resident.values()))
            else:  # the front is not needed by this step: its ids were all moved to the end
                _, slot = self._resident.popitem(last=False)
            self._resident[lora_id] = slot
            loads.append((slot, lora_id))
        return {lora_id: self._resident[lora_id] for lora_id in wanted}, loads
