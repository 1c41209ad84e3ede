"""SlotKVCache against an obvious reference: a dict of (row, position) -> key/value vectors."""

from __future__ import annotations

import pytest
import torch

from pixelprune.model.kvcache import SlotKVCache

LAYERS, HEADS, DIM = 2, 3, 4


def make(capacity=1024) -> SlotKVCache:
    return SlotKVCache(LAYERS, HEADS, DIM, capacity, torch.device("cpu"), torch.float32)


def write(cache, ref, rows: slice, positions: list[list[int]], kv_len: int, seed: int):
    """Run one `update` per layer like a forward would, mirror it in `ref`, return the views."""
    gen = torch.Generator().manual_seed(seed)
    write_pos = torch.tensor(positions)
    cache.begin(rows, write_pos, kv_len)
    views = []
    for layer in range(LAYERS):
        k = torch.randn(len(positions), HEADS, len(positions[0]), DIM, generator=gen)
        v = torch.randn(len(positions), HEADS, len(positions[0]), DIM, generator=gen)
        views.append(cache.update(k, v, layer))
        for i, row_pos in enumerate(positions):
            for t, p in enumerate(row_pos):
                ref[(layer, rows.start + i, p)] = (k[i, :, t], v[i, :, t])
    return views


def check(cache, ref):
    for (layer, row, pos), (k, v) in ref.items():
        keys, values = cache._views[layer]
        assert torch.equal(keys[row, :, pos], k) and torch.equal(values[row, :, pos], v)


def test_update_writes_at_each_rows_positions_and_returns_the_rows_views():
    cache, ref = make(), {}
    assert (cache.slot_len, cache.slots, cache.nbytes) == (256, 4, 1024 * 2 * LAYERS * HEADS * DIM * 4)
    write(cache, ref, slice(0, 4), [[0, 1, 2]] * 4, 3, seed=0)
    views = write(cache, ref, slice(1, 3), [[3, 4, 255], [3, 4, 5]], 6, seed=1)  # row 1: a pad at the last position
    check(cache, ref)
    keys, values = views[1]
    assert keys.shape == values.shape == (2, HEADS, 6, DIM)
    assert torch.equal(keys[0, :, 4], ref[(1, 1, 4)][0]) and torch.equal(values[1, :, 0], ref[(1, 2, 0)][1])
    assert cache.get_seq_length() == cache.get_query_offset() == 3 and cache.get_max_cache_shape() == 256
    assert cache.get_mask_sizes(3) == (6, 0)  # what create_causal_mask asks when no 4-D mask is given
    with pytest.raises(ValueError):
        cache.begin(slice(3, 5), torch.zeros((2, 1), dtype=torch.long), 1)  # only 4 rows of 256


def test_relayout_keeps_the_running_rows():
    cache, ref = make(2048), {}
    write(cache, ref, slice(0, 3), [[0, 1, 2, 3, 4]] * 3, 5, seed=3)
    cache.relayout(512, rows=3, length=5)
    assert (cache.slot_len, cache.slots) == (512, 4)
    check(cache, ref)
    cache.relayout(256, rows=3, length=5)
    check(cache, ref)
    with pytest.raises(ValueError):
        cache.relayout(1024, rows=3, length=5)  # 3 rows of 1024 do not fit 2048


def test_move_read_and_write_back():
    cache, ref = make(), {}
    write(cache, ref, slice(0, 3), [[0, 1, 2, 3]] * 3, 4, seed=4)
    saved = cache.read(2, 3)
    assert saved.shape == (LAYERS, 2, HEADS, 3, DIM)
    cache.move(2, 0, 4)
    check(cache, {(layer, 0, pos): ref[(layer, 2, pos)] for layer in range(LAYERS) for pos in range(4)})
    cache.write(3, saved)
    check(cache, {(layer, 3, pos): ref[(layer, 2, pos)] for layer in range(LAYERS) for pos in range(3)})
