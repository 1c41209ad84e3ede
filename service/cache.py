"""A bounded, thread-safe LRU for vision-encoder outputs.

Key: (content digest, pruning settings key, resized (w, h)); the same pixels
pruned the same way give the same kept blocks and so the same vision features.
The content digest is exact (blake2b of the image bytes as sent), because the
cache is shared across sessions.
A new instruction on an unchanged screen then skips the vision encoder. The
values can be large (device tensors), so the bound is an entry count kept small.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """At most `capacity` entries; the least recently used one is evicted first. capacity 0 = off."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # lookups that found an entry
        self.misses = 0  # lookups that did not

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: V) -> None:
        if self.capacity == 0 or value is None:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


def vision_key(content_digest: bytes, settings: tuple, resized_size: tuple[int, int]) -> tuple:
    """The cache key of one frame's vision features."""
    return (bytes(content_digest), tuple(settings), tuple(resized_size))
