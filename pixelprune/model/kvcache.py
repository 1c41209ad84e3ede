"""A preallocated key/value cache for batched decoding: one pool per layer, one slot per sequence.

Each layer owns a flat pool of `capacity_tokens` key and value vectors, allocated once on
the model's device. The pool is viewed as `(slots, kv_heads, slot_len, head_dim)`; a running
sequence owns one slot (row) and its tokens sit at positions 0..length-1 of that row. The
running sequences are kept in rows 0..n-1 (`move` fills a finished sequence's row with the
last one). `slot_len` is one of `LENGTH_BUCKETS`, chosen for the longest sequence running;
`relayout` changes it without losing what the running rows hold.

The attention layers of transformers 5.24 call `cache.update(k, v, layer_idx, **kwargs)`
(`Qwen3VLTextAttention.forward`); before each forward `begin(rows, write, kv_len)` says which
rows run, where each query token's key and value go (tensor indices: no host sync, so the
decode step can be captured in a CUDA graph), and how many positions attention reads.
Masking is the caller's: it passes a 4-D mask, which transformers' `create_causal_mask`
returns as it is; only a single row starting at position 0 runs without one (plain causal
attention), and then the mask sizes come from `begin`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from pixelprune.model.scheduler import LENGTH_BUCKETS


class SlotKVCache(Cache):
    """Keys and values of up to `capacity_tokens // slot_len` sequences; see the module docstring.

    Subclass of transformers' `Cache` (5.24, `cache_utils.py`) with no layer objects: `update`
    is replaced; mask-size queries are never made because the mask comes in 4-D."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity_tokens: int,
                 device: torch.device, dtype: torch.dtype):
        super().__init__(layers=[])
        if capacity_tokens < LENGTH_BUCKETS[0]:
            raise ValueError(f"capacity_tokens must be >= {LENGTH_BUCKETS[0]}, got {capacity_tokens}")
        self.kv_heads, self.head_dim, self.capacity_tokens = kv_heads, head_dim, capacity_tokens
        self.device, self.dtype = torch.device(device), dtype
        size = capacity_tokens * kv_heads * head_dim
        self._pools = [(torch.zeros(size, device=device, dtype=dtype), torch.zeros(size, device=device, dtype=dtype))
                       for _ in range(num_layers)]
        self.slot_len = 0
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.set_layout(LENGTH_BUCKETS[0])
        self._rows = slice(0, 0)  # the rows the current forward runs on
        self._write: torch.Tensor | None = None  # (rows, q) int64: position of each query token
        self._row_index: torch.Tensor | None = None  # (rows, 1) int64: 0..rows-1
        self._kv_len = 0  # positions the current forward's attention reads
        self._past = 0  # positions before the current forward's queries

    @property
    def num_layers(self) -> int:
        return len(self._pools)

    @property
    def slots(self) -> int:
        """Rows of the current layout."""
        return self.capacity_tokens // self.slot_len

    @property
    def bytes_per_token(self) -> int:
        """Key + value bytes of one token over all layers."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of all pools (allocated once)."""
        return self.capacity_tokens * self.bytes_per_token

    def set_layout(self, slot_len: int) -> None:
        """View the pools as (capacity // slot_len, kv_heads, slot_len, head_dim); contents are not moved."""
        if slot_len > self.capacity_tokens:
            raise ValueError(f"slot length {slot_len} exceeds the cache capacity {self.capacity_tokens}")
        rows = self.capacity_tokens // slot_len
        shape, used = (rows, self.kv_heads, slot_len, self.head_dim), rows * self.kv_heads * slot_len * self.head_dim
        self._views = [(k[:used].view(shape), v[:used].view(shape)) for k, v in self._pools]
        self.slot_len = slot_len

    def relayout(self, slot_len: int, rows: int, length: int) -> None:
        """Change the slot length keeping positions 0..length-1 of rows 0..rows-1. Each layer's kept
        part is copied out and back (its own pool; one layer's copy is held at a time)."""
        if slot_len == self.slot_len:
            return
        if rows * slot_len > self.capacity_tokens or length > slot_len:
            raise ValueError(f"{rows} rows of {length} tokens do not fit slots of {slot_len} in {self.capacity_tokens}")
        old = self._views
        self.set_layout(slot_len)
        if not rows or not length:
            return
        for pair_old, pair_new in zip(old, self._views):
            for before, after in zip(pair_old, pair_new):
                after[:rows, :, :length].copy_(before[:rows, :, :length].clone())

    def begin(self, rows: slice, write: torch.Tensor, kv_len: int) -> None:
        """Set up the next forward: it runs on `rows` (a contiguous range of slots), query token t of
        row i writes its key and value at position write[i, t], attention reads positions < kv_len."""
        if rows.stop > self.slots or kv_len > self.slot_len:
            raise ValueError(f"rows {rows.start}..{rows.stop} / {kv_len} positions exceed the layout "
                             f"({self.slots} rows of {self.slot_len})")
        self._rows, self._write, self._kv_len = rows, write, kv_len
        self._row_index = torch.arange(write.shape[0], device=write.device)[:, None]
        self._past = kv_len - write.shape[1]  # positions before the queries (all rows alike when no mask is given)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (rows, kv_heads, q, head_dim) keys/values at `begin`'s positions; return the rows'
        views (rows, kv_heads, kv_len, head_dim) for attention."""
        keys, values = (view[self._rows] for view in self._views[layer_idx])
        keys[self._row_index, :, self._write] = key_states.transpose(1, 2).to(keys.dtype)
        values[self._row_index, :, self._write] = value_states.transpose(1, 2).to(values.dtype)
        return keys[:, :, :self._kv_len], values[:, :, :self._kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy positions 0..length-1 of row src into row dst (compaction after a sequence ends)."""
        if src == dst or length == 0:
            return
        for keys, values in self._views:
            keys[dst, :, :length].copy_(keys[src, :, :length])
            values[dst, :, :length].copy_(values[src, :, :length])

    def read(self, row: int, length: int) -> torch.Tensor:
        """A copy of positions 0..length-1 of one row: (layers, 2, kv_heads, length, head_dim)."""
        return torch.stack([torch.stack((k[row, :, :length], v[row, :, :length])) for k, v in self._views])

    def write(self, row: int, kv: torch.Tensor) -> None:
        """Put `read`'s output back at positions 0..kv.shape[3]-1 of `row`."""
        length = kv.shape[3]
        for layer, (keys, values) in enumerate(self._views):
            keys[row, :, :length].copy_(kv[layer, 0])
            values[row, :, :length].copy_(kv[layer, 1])

    # What transformers' `create_causal_mask` asks when it gets no 4-D mask (one row from position 0:
    # a plain causal mask, which sdpa runs as is_causal)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._past

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._past

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._past + query_length, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.slot_len
