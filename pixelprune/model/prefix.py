"""Reuse across requests on one screen: the prompt prefix's keys and values, and the vision features.

The prompt puts the image(s) before the instruction, so every token up to the last image
token depends only on the chat template, the pixels and the pruning: a `PrefixEntry` holds
those tokens' keys and values (all layers) plus the positions the continuation needs. A
request with the same cache key copies the entry into its cache slot and prefills only the
tokens after it. Keys are opaque to the engine; the caller builds them so that they separate
everything the prefix depends on (tenant, exact frame content, pruning settings, resized size;
one engine serves one model). The entry also records the prefix's own token ids and image
grid, and is not used for a prompt whose prefix differs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

import torch

V = TypeVar("V")


@dataclass(frozen=True)
class PrefixEntry:
    kv: torch.Tensor  # (layers, 2, kv_heads, length, head_dim) on the model's device: keys, values
    length: int  # prefix tokens: up to and including the last image token
    next_mrope: int  # MRoPE position (all three rows) of the first token after the prefix
    text_ids: tuple[int, ...]  # the prefix's non-image token ids (the chat template's head)
    grids: tuple[tuple[int, int, int], ...]  # image grids (t, h, w) the prefix was built for
    kept_blocks: tuple[int, ...]  # visual tokens per image

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class BoundedLRU(Generic[V]):
    """A thread-safe LRU bounded by the sum of `size(value)` (bytes, or 1 per entry); 0 = off.
    Counts lookups (`queries`) and the ones that found an entry (`hits`)."""

    def __init__(self, capacity: int, size: Callable[[V], int] = lambda value: 1):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity, self._size = int(capacity), size
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.used = 0  # sum of the sizes held
        self.hits = 0
        self.queries = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            self.queries += 1
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Store `value` (evicting least recently used entries); False when it alone exceeds the capacity."""
        size = int(self._size(value))
        if size > self.capacity:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old[1]
            self._items[key] = (value, size)
            self.used += size
            while self.used > self.capacity:
                _, (_, evicted) = self._items.popitem(last=False)
                self.used -= evicted
        return True

    def discard(self, key: Hashable) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old[1]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
