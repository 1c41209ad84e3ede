"""block_hashes against a per-block pure-Python computation, and its
equal-blocks -> equal-hashes property; frame_digest."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pixelprune import hashing
from pixelprune.hashing import _MULTIPLIERS, block_hashes, frame_digest

MASK = (1 << 64) - 1


def slow_block_hash(block: np.ndarray) -> int:
    """One block with Python integers: 384 little-endian 8-byte words (12 per
    pixel row), w ^ (w >> 29) times its position's multiplier, summed mod 2**64,
    plus the seed, then the splitmix64 finaliser."""
    raw = block.tobytes()
    total = 0
    for n in range(384):
        word = int.from_bytes(raw[8 * n:8 * n + 8], "little")
        total += (word ^ (word >> 29)) * int(_MULTIPLIERS.reshape(-1)[n])
    z = (total + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_matches_slow_reference():
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    got = block_hashes(pixels)
    assert got.dtype == np.uint64 and got.shape == (3, 4)
    for r in range(3):
        for c in range(4):
            block = np.ascontiguousarray(pixels[32 * r:32 * r + 32, 32 * c:32 * c + 32])
            assert int(got[r, c]) == slow_block_hash(block)


def test_multipliers_are_odd_and_distinct():
    flat = _MULTIPLIERS.reshape(-1)
    assert flat.size == 384 and (flat & np.uint64(1)).all() and np.unique(flat).size == 384


def test_equal_blocks_equal_hashes_anywhere():
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (4, 5))
    pixels = palette[labels].transpose(0, 2, 1, 3, 4).reshape(128, 160, 3)
    hashes = block_hashes(pixels)
    for a in range(3):
        assert np.unique(hashes[labels == a]).size == 1
    assert np.unique(hashes).size == 3
    # The same block in another frame of another size hashes the same.
    other = np.zeros((64, 32, 3), np.uint8)
    other[32:] = palette[2]
    assert block_hashes(other)[1, 0] == hashes[labels == 2][0]


def test_every_single_bit_flip_changes_the_hash():
    block = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    base = block_hashes(block)[0, 0]
    flat = block.reshape(-1)
    for index in range(0, flat.size, 37):
        for bit in range(8):
            flipped = flat.copy()
            flipped[index] ^= np.uint8(1 << bit)
            assert block_hashes(flipped.reshape(32, 32, 3))[0, 0] != base


def test_distinct_random_blocks():
    pixels = np.random.default_rng(3).integers(0, 256, (32 * 16, 32 * 16, 3), dtype=np.uint8)
    assert np.unique(block_hashes(pixels)).size == 256


def test_frame_digest():
    frame = np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = hashlib.blake2b(np.array([20, 30, 3], np.int64).tobytes() + frame.tobytes(), digest_size=32)
    assert frame_digest(frame) == expected.digest()
    assert frame_digest(frame.copy()) == frame_digest(frame)
    changed = frame.copy()
    changed[19, 29, 2] ^= 1
    assert frame_digest(changed) != frame_digest(frame)
    # Same bytes, different shape: different frames.
    assert frame_digest(np.zeros((32, 64, 3), np.uint8)) != frame_digest(np.zeros((64, 32, 3), np.uint8))
    # A non-contiguous view hashes like its copy.
    assert frame_digest(frame[:, ::2]) == frame_digest(np.ascontiguousarray(frame[:, ::2]))


@pytest.mark.parametrize("pixels, message", [
    (np.zeros((32, 32, 3), np.int16), "uint8"),
    (np.zeros((32, 32), np.uint8), "shape"),
    (np.zeros((32, 40, 3), np.uint8), "multiples of 32"),
])
def test_bad_input(pixels, message):
    with pytest.raises(ValueError, match=message):
        block_hashes(pixels)
    if "multiples" not in message:
        with pytest.raises(ValueError, match=message):
            frame_digest(pixels)


@pytest.mark.parametrize("shape", [(32, 32), (96, 160), (1088, 1920)])
def test_compiled_and_numpy_paths_agree(shape):
    """Replicas with and without numba share sessions in Redis: both paths must give the
    same numbers, on random pixels and on a frame with many equal blocks."""
    if hashing._KERNELS.load() is None:
        pytest.skip("numba is not installed: only the numpy path exists")
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    pixels[: shape[0] // 2] = 200
    compiled = block_hashes(pixels)
    hashing._KERNELS.disabled = True
    try:
        vectorised = block_hashes(pixels)
    finally:
        hashing._KERNELS.disabled = False
    np.testing.assert_array_equal(compiled, vectorised)
    assert compiled[0, 0] == compiled[-1 if shape[0] == 32 else 0, -1]  # equal blocks, equal hashes
