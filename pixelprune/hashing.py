"""Fingerprints of frames and of their 32x32 blocks.

`block_hashes` gives one 64-bit number per block in one vectorised pass, so two
frames (or two positions of one frame) can be compared block by block without
touching the pixels again: equal blocks always get equal hashes; unequal blocks
get unequal hashes except with probability about 2**-64 per pair (not a
cryptographic hash: use it to find candidates, never as proof of equality).
`frame_digest` is a cryptographic digest of a whole frame (exact identity).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pixelprune._jit import Kernels
from pixelprune.geometry import BLOCK_SIZE, check_block_pixels, check_pixels

_WORDS_PER_ROW = BLOCK_SIZE * 3 // 8  # 12 uint64 words hold one 32-px row of a block
_SEED = 0x9E3779B97F4A7C15  # 2**64 / golden ratio


def _odd_multipliers(count: int) -> np.ndarray:
    """`count` fixed odd 64-bit multipliers (splitmix64 sequence, made odd)."""
    state = _SEED
    out = np.empty(count, dtype=np.uint64)
    mask = (1 << 64) - 1
    for i in range(count):
        state = (state + _SEED) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out[i] = (z ^ (z >> 31)) | 1
    return out


# One multiplier per word position inside a block: (32 rows, 12 words).
_MULTIPLIERS = _odd_multipliers(BLOCK_SIZE * _WORDS_PER_ROW).reshape(BLOCK_SIZE, 1, _WORDS_PER_ROW)


def _finalise(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (bijective): spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def block_hashes(pixels: np.ndarray) -> np.ndarray:
    """uint64 (H/32, W/32): a hash of each 32x32 block of a uint8 (H, W, 3) image.

    Each block is read as 384 uint64 words; every word is mixed (xor-shift) and
    multiplied by a fixed odd constant for its position, the products are summed
    with wrapping arithmetic, offset by a constant and finalised. Depends only on the block's
    bytes, so equal blocks give equal hashes wherever they are. One compiled pass with numba,
    four vectorised passes without; both give the same numbers (replicas may differ)."""
    check_block_pixels(pixels)
    height, width = pixels.shape[:2]
    rows, cols = height // BLOCK_SIZE, width // BLOCK_SIZE
    words = np.ascontiguousarray(pixels).reshape(height, width * 3).view(np.uint64)
    kernels = _KERNELS.load()
    with np.errstate(over="ignore"):
        if kernels is not None:
            summed = np.zeros((rows, cols), dtype=np.uint64)
            kernels["sum"](words, _MULTIPLIERS.reshape(BLOCK_SIZE, _WORDS_PER_ROW), summed)
        else:
            words = words.reshape(rows, BLOCK_SIZE, cols, _WORDS_PER_ROW)
            mixed = words >> np.uint64(29)
            mixed ^= words
            mixed *= _MULTIPLIERS
            # Rows first (contiguous adds), then the 12 words of each block row.
            summed = mixed.sum(axis=1, dtype=np.uint64).sum(axis=-1, dtype=np.uint64)
        return _finalise(summed + np.uint64(_SEED))


def _sum_kernel(words, multipliers, out):
    """out[r, c] += sum over the block's words of (w ^ (w >> 29)) * multipliers[row, word],
    wrapping; reads the image once, row by row (compiled with numba)."""
    rows, cols = out.shape
    for r in range(rows):
        for dy in range(32):
            line = words[r * 32 + dy]
            weights = multipliers[dy]
            for c in range(cols):
                acc = out[r, c]
                for k in range(12):
                    w = line[c * 12 + k]
                    acc += ((w >> np.uint64(29)) ^ w) * weights[k]
                out[r, c] = acc


_KERNELS = Kernels(globals(), {"sum": "_sum_kernel"})


def frame_digest(pixels: np.ndarray) -> bytes:
    """blake2b (32 bytes) of the frame's shape and bytes: equal digests <=> equal frames."""
    check_pixels(pixels)
    digest = hashlib.blake2b(digest_size=32)
    digest.update(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.digest()
