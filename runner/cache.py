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
            slot = len(self._slots)
        else:
            _, slot = self._slots.popitem(last=False)
        self._slots[key] = slot
        return slot

    def clear(self) -> None:
        self._slots.clear()

    def __len__(self) -> int:
        return len(self._slots)
