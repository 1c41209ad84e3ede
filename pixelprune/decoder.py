"""Rebuild a whole image from its kept blocks: the constructive side of
PixelPrune's Propositions 1 and 2.

A decoder that knows the grid, which blocks were kept (the mask) and their
pixels, and the scan/predictor rule, walks the blocks in the encoder's order and
gives every dropped block its prediction's value, evaluating the predictor on
blocks it has already rebuilt. At tau = 0 this reproduces the original exactly;
at tau > 0, with an encoder that tracked these reconstructions, every rebuilt
block is within tau of its original. The tests use it as the proof.
"""

from __future__ import annotations

import numpy as np

from pixelprune.geometry import BLOCK_SIZE
from pixelprune.selectors import scan_order, threshold_units


class _Rebuilt:
    """Similarity of rebuilt blocks, each a copy of some kept block (by index)."""

    def __init__(self, kept_blocks: np.ndarray, is_max: bool, thr: int):
        self.values = kept_blocks.reshape(kept_blocks.shape[0], -1).astype(np.int16)
        self.is_max, self.thr = is_max, thr
        self.cache: dict[tuple[int, int], bool] = {}

    def similar(self, i: int, j: int) -> bool:
        if i == j:
            return True
        key = (min(i, j), max(i, j))
        if key not in self.cache:
            diff = np.abs(self.values[i] - self.values[j])
            dist = int(diff.max()) if self.is_max else int(diff.sum())
            self.cache[key] = dist <= self.thr
        return self.cache[key]


def _check(kept_blocks, keep) -> tuple[np.ndarray, np.ndarray]:
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.ndim != 2 or keep.size == 0:
        raise ValueError(f"keep must be a non-empty 2-D bool array, got {keep.dtype} {keep.shape}")
    if not keep[0, 0]:
        raise ValueError("keep[0, 0] must be True: the top-left block is always kept")
    kept_blocks = np.asarray(kept_blocks)
    expected = (int(keep.sum()), BLOCK_SIZE, BLOCK_SIZE, 3)
    if kept_blocks.dtype != np.uint8 or kept_blocks.shape != expected:
        raise ValueError(f"kept_blocks must be uint8 {expected} (one block per True in keep), "
                         f"got {kept_blocks.dtype} {kept_blocks.shape}")
    return kept_blocks, keep


def reconstruct(kept_blocks: np.ndarray, keep: np.ndarray, method: str = "pred2d",
                metric: str = "max", tau: float = 0.0) -> np.ndarray:
    """uint8 (h*32, w*32, 3) image rebuilt from `kept_blocks` (K, 32, 32, 3, in
    raster order of the True cells of `keep`) with the encoder's settings."""
    thr = threshold_units(method, metric, tau)
    kept_blocks, keep = _check(kept_blocks, keep)
    rows, cols = keep.shape
    if method == "pred2d":
        source = _pred2d_sources(keep, _Rebuilt(kept_blocks, metric == "max", thr))
    else:
        source = _sequence_sources(keep, scan_order(method, rows, cols))
    image = kept_blocks[source].reshape(rows, cols, BLOCK_SIZE, BLOCK_SIZE, 3)
    return image.transpose(0, 2, 1, 3, 4).reshape(rows * BLOCK_SIZE, cols * BLOCK_SIZE, 3)


def _sequence_sources(keep: np.ndarray, order: np.ndarray) -> np.ndarray:
    """1-D scans: a dropped block copies the previous block of the scan, i.e. the
    last kept one (forward fill along the scan order)."""
    kept_index = np.cumsum(keep.reshape(-1)) - 1  # raster rank of each kept block
    in_order = keep.reshape(-1)[order]
    last_kept = np.maximum.accumulate(np.where(in_order, np.arange(order.size), 0))
    source = np.empty(order.size, dtype=np.int64)
    source[order] = kept_index[order[last_kept]]
    return source


def _pred2d_sources(keep: np.ndarray, rebuilt: _Rebuilt) -> np.ndarray:
    """pred2d in raster order on rebuilt blocks: A = left, B = above, C =
    above-left; first row copies A, first column copies B, elsewhere B when
    C ~ A and not C ~ B (a vertical edge), else A."""
    rows, cols = keep.shape
    flat_keep = keep.reshape(-1)
    kept_index = np.cumsum(flat_keep) - 1
    source = np.empty(rows * cols, dtype=np.int64)
    for x in range(rows * cols):
        if flat_keep[x]:
            source[x] = kept_index[x]
            continue
        r, c = divmod(x, cols)
        if r == 0:
            source[x] = source[x - 1]
        elif c == 0:
            source[x] = source[x - cols]
        else:
            a, b, corner = source[x - 1], source[x - cols], source[x - cols - 1]
            use_b = rebuilt.similar(corner, a) and not rebuilt.similar(corner, b)
            source[x] = b if use_b else a
    return source
