"""A small LRU that maps token ids to a slot index, for the prompt-embedding cache.

Executors keep the embeddings themselves (device buffers, or numpy arrays on the CPU); this class only
decides which slot holds which prompt and which slot to reuse.
"""

from __future__ import annotations

from collections import OrderedDict


class SlotLRU:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._slots: OrderedDict[bytes, int] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def lookup(self, key: bytes) -> int | None:
        slot = self._slots.get(key)
        if slot is None:
            self.misses += 1
            return None
        self._slots.move_to_end(key)
        self.hits += 1
        return slot

    def assign(self, key: bytes) -> int | None:
        """The slot to store `key` in (the least recently used one when full); None when capacity is 0."""
        if self.capacity == 0:
            return None
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        if len(self._slots) < self.capacity:
            slot = self._free_slot()
        else:
            _, slot = self._slots.popitem(last=False)
        self._slots[key] = slot
        return slot

    def next_slot(self, key: bytes) -> int | None:
        """The slot `assign(key)` would return, without assigning it (so a failed run can leave the cache
        as it was: fill the slot, and only `assign` once the fill has succeeded)."""
        if self.capacity == 0:
            return None
        if key in self._slots:
            return self._slots[key]
        if len(self._slots) < self.capacity:
            return self._free_slot()
        return next(iter(self._slots.values()))

    def evict_slot(self, slot: int) -> None:
        """Forget whichever prompt slot `slot` holds (its contents can no longer be trusted)."""
        for key, held in list(self._slots.items()):
            if held == slot:
                del self._slots[key]

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        return next(i for i in range(self.capacity) if i not in used)

    def clear(self) -> None:
        self._slots.clear()

    def __len__(self) -> int:
        return len(self._slots)
