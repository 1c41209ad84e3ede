"""Which 32x32 blocks to keep: PixelPrune's scan orders and predictors.

A block is dropped when its prediction (an earlier block in the scan, chosen by
the method) is within `tau` of it under the metric; the top-left block is always
kept. Distances are computed in integer pixel units, equivalent to the paper's
[0, 1] floats: `max`: max |a - b| <= floor(tau * 255), `mae`: sum |a - b| <=
tau * 255 * 3072 (see `threshold_units`).

tau = 0 (lossless) is fully vectorised: blocks are compared as uint64 words.
tau > 0 follows Proposition 2: the encoder tracks what the decoder rebuilds, so
a dropped block serves later as a neighbour with its prediction's value. Every
reconstruction is a copy of some original block, so only a source index per
block is tracked. That path runs a compiled loop when numba is installed and a
numpy anti-diagonal wavefront (pred2d) or anchor scan (raster, serpentine)
otherwise; both give the same masks.
"""

from __future__ import annotations

import math

import numpy as np

from pixelprune._jit import Kernels
from pixelprune.geometry import BLOCK_SIZE, check_block_pixels
from pixelprune.hashing import block_hashes
from pixelprune.settings import METHODS, METRICS

BLOCK_VALUES = BLOCK_SIZE * BLOCK_SIZE * 3  # 3072 uint8 values per block
_ROW_BYTES = BLOCK_SIZE * 3  # 96 bytes: one pixel row of one block
_ROW_WORDS = _ROW_BYTES // 8  # 12 uint64 words


def threshold_units(method: str, metric: str, tau: float) -> int:
    """Validate the settings; return tau in integer units of the metric:
    `max` -> largest allowed |a - b| (0..255 scale), `mae` -> largest allowed
    sum |a - b| over the block's 3072 values. 0 means exact equality."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.integer, np.floating)):
        raise ValueError(f"tau must be a number, got {type(tau).__name__}")
    tau = float(tau)
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau}")
    largest = 255 if metric == "max" else 255 * BLOCK_VALUES  # distance 1.0 in [0, 1] units
    if tau >= 1.0:  # no two blocks are further apart than 1.0
        return largest
    # The epsilon absorbs float error in tau * largest (e.g. tau = 2/255 -> 2).
    return int(math.floor(tau * largest + 1e-6))


def scan_order(method: str, rows: int, cols: int) -> np.ndarray:
    """Flat block indices in the scan order of a 1-D method (raster, serpentine)."""
    order = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    if method == "serpentine":
        order[1::2] = order[1::2, ::-1]
    return order.reshape(-1)


def select_blocks(pixels: np.ndarray, method: str = "pred2d", metric: str = "max",
                  tau: float = 0.0) -> np.ndarray:
    """Keep mask, bool (H/32, W/32), of a uint8 (H, W, 3) image whose sides are
    multiples of 32 (the resized image). See the module docstring for the rule."""
    thr = threshold_units(method, metric, tau)
    check_block_pixels(pixels)
    rows, cols = pixels.shape[0] // BLOCK_SIZE, pixels.shape[1] // BLOCK_SIZE
    if rows * cols == 1:
        return np.ones((1, 1), dtype=bool)
    pixels = np.ascontiguousarray(pixels)
    if thr == 0:  # similarity is equality: transitive, tracking changes nothing
        return _exact_mask(pixels, method)
    if _numba_kernels():
        return _track_numba(pixels, method, metric == "max", thr)
    return _track_numpy(pixels, method, metric == "max", thr)


# ---------------------------------------------------------------- tau = 0
def _exact_mask(pixels: np.ndarray, method: str) -> np.ndarray:
    """Vectorised exact selection from the equalities of adjacent blocks."""
    height, width = pixels.shape[:2]
    rows, cols = height // BLOCK_SIZE, width // BLOCK_SIZE
    words = pixels.reshape(height, width * 3).view(np.uint64)
    # right[r, c]: block (r, c) == (r, c+1); down[r, c]: block (r, c) == (r+1, c).
    differ = words[:, _ROW_WORDS:] != words[:, :-_ROW_WORDS]
    differ = differ.reshape(rows, BLOCK_SIZE, (cols - 1) * _ROW_WORDS).any(axis=1)
    right = ~differ.reshape(rows, cols - 1, _ROW_WORDS).any(axis=-1)
    bands = words.reshape(rows, -1)
    differ = (bands[1:] != bands[:-1]).reshape(rows - 1, BLOCK_SIZE, cols * _ROW_WORDS).any(axis=1)
    down = ~differ.reshape(rows - 1, cols, _ROW_WORDS).any(axis=-1)
    keep = np.zeros((rows, cols), dtype=bool)
    if method == "pred2d":
        keep[0, 1:] = ~right[0]
        keep[1:, 0] = ~down[:, 0]
        use_b = down[:, :-1] & ~right[:-1]  # similar(C, A) and not similar(C, B)
        keep[1:, 1:] = ~np.where(use_b, down[:, 1:], right[1:])
    elif method == "raster":
        keep[:, 1:] = ~right
        grid = words.reshape(rows, BLOCK_SIZE, cols, _ROW_WORDS)
        keep[1:, 0] = (grid[1:, :, 0] != grid[:-1, :, -1]).any(axis=(1, 2))
    else:  # serpentine: even rows left to right, odd rows right to left
        keep[0::2, 1:] = ~right[0::2]
        keep[1::2, :-1] = ~right[1::2]
        keep[2::2, 0] = ~down[1::2, 0]
        keep[1::2, -1] = ~down[0::2, -1]
    keep[0, 0] = True
    return keep


# ------------------------------------------------- tau > 0, compiled (numba)


def _block_similar(words, cols, i, j, is_max, thr):
    """dist(block i, block j) <= thr for flat block indices; `words` is the image
    as uint64 (H, W*3/8). Equal words are skipped 8 bytes at a time; only the
    bytes of differing words are measured, with an early exit."""
    if i == j:
        return True
    y0, x0 = (i // cols) * 32, (i % cols) * 12
    y1, x1 = (j // cols) * 32, (j % cols) * 12
    total = 0
    for dy in range(32):
        row_a = words[y0 + dy, x0:x0 + 12]
        row_b = words[y1 + dy, x1:x1 + 12]
        for k in range(12):
            a, b = row_a[k], row_b[k]
            if a == b:
                continue
            for shift in range(0, 64, 8):
                va = np.int64((a >> np.uint64(shift)) & np.uint64(255))
                vb = np.int64((b >> np.uint64(shift)) & np.uint64(255))
                d = abs(va - vb)
                if is_max and d > thr:
                    return False
                total += d
        if not is_max and total > thr:
            return False
    return True


def _pred2d_kernel(words, rows, cols, is_max, thr):
    """pred2d with reconstruction tracking, raster order; returns flat keep."""
    keep = np.zeros(rows * cols, dtype=np.bool_)
    src = np.arange(rows * cols)
    keep[0] = True
    for x in range(1, rows * cols):
        r, c = x // cols, x % cols
        if r == 0:
            p = src[x - 1]
        elif c == 0:
            p = src[x - cols]
        else:
            a, b, cc = src[x - 1], src[x - cols], src[x - cols - 1]
            p = a
            if a != b and _block_similar(words, cols, cc, a, is_max, thr) \
                    and not _block_similar(words, cols, cc, b, is_max, thr):
                p = b
        if _block_similar(words, cols, x, p, is_max, thr):
            src[x] = p
        else:
            keep[x] = True
    return keep


def _sequence_kernel(words, cols, order, is_max, thr):
    """1-D scan: each block is compared with the last kept one (its reconstruction)."""
    keep = np.zeros(order.shape[0], dtype=np.bool_)
    anchor = order[0]
    keep[anchor] = True
    for k in range(1, order.shape[0]):
        x = order[k]
        if not _block_similar(words, cols, x, anchor, is_max, thr):
            keep[x] = True
            anchor = x
    return keep


_KERNELS = Kernels(globals(), {"pred2d": "_pred2d_kernel", "sequence": "_sequence_kernel"},
                   helpers=("_block_similar",))


def _numba_kernels() -> bool:
    """Compile the kernels on first use; False when numba is not installed."""
    return _KERNELS.load() is not None


def _track_numba(pixels: np.ndarray, method: str, is_max: bool, thr: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    rows, cols = height // BLOCK_SIZE, width // BLOCK_SIZE
    words = pixels.reshape(height, width * 3).view(np.uint64)
    if method == "pred2d":
        keep = _KERNELS["pred2d"](words, rows, cols, is_max, thr)
    else:
        keep = _KERNELS["sequence"](words, cols, scan_order(method, rows, cols), is_max, thr)
    return keep.reshape(rows, cols)


# ------------------------------------------------------ tau > 0, plain numpy
class _PairTest:
    """Vectorised `dist(block i, block j) <= thr` for arrays of block pairs.

    Three stages: blocks proven equal (same hash, verified bytes) are similar;
    a 1/4 subsample of rows bounds the distance from below (max over a subset,
    sum over a subset) and rejects most dissimilar pairs; the rest is computed
    on all 3072 values."""

    def __init__(self, pixels: np.ndarray, is_max: bool, thr: int):
        rows, cols = pixels.shape[0] // BLOCK_SIZE, pixels.shape[1] // BLOCK_SIZE
        grid = pixels.reshape(rows, BLOCK_SIZE, cols, _ROW_BYTES).transpose(0, 2, 1, 3)
        self.blocks = np.ascontiguousarray(grid).reshape(rows * cols, BLOCK_SIZE, _ROW_BYTES)
        self.probe = np.ascontiguousarray(self.blocks[:, ::4]).reshape(rows * cols, -1)
        self.is_max, self.thr = is_max, thr
        self.ids = self._equality_ids(block_hashes(pixels).reshape(-1))

    def _equality_ids(self, hashes: np.ndarray) -> np.ndarray:
        """Equal ids => equal bytes (each block is checked against its hash group's first)."""
        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        ids = first[inverse.reshape(-1)]
        check = np.flatnonzero(ids != np.arange(ids.size))
        same = (self.blocks[check] == self.blocks[ids[check]]).all(axis=(1, 2))
        ids[check[~same]] = ids.size + check[~same]  # hash collision: an id of its own
        return ids

    def _within(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        diff = np.maximum(a, b) - np.minimum(a, b)
        dist = diff.max(axis=1) if self.is_max else diff.sum(axis=1, dtype=np.int64)
        return dist <= self.thr

    def __call__(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        similar = self.ids[i] == self.ids[j]
        todo = np.flatnonzero(~similar)
        if todo.size:
            todo = todo[self._within(self.probe[i[todo]], self.probe[j[todo]])]
        if todo.size:
            count = todo.size
            similar[todo] = self._within(self.blocks[i[todo]].reshape(count, -1),
                                         self.blocks[j[todo]].reshape(count, -1))
        return similar


def _track_numpy(pixels: np.ndarray, method: str, is_max: bool, thr: int) -> np.ndarray:
    rows, cols = pixels.shape[0] // BLOCK_SIZE, pixels.shape[1] // BLOCK_SIZE
    similar = _PairTest(pixels, is_max, thr)
    if method == "pred2d":
        keep = _wavefront_pred2d(similar, rows, cols)
    else:
        keep = _anchor_scan(similar, scan_order(method, rows, cols))
    return keep.reshape(rows, cols)


def diagonal_table(rows: int, cols: int) -> tuple[np.ndarray, list[int]]:
    """Blocks other than (0, 0) in anti-diagonal order (k = r + c = 1, 2, ...):
    rows of the (6, n-1) table are the flat index X, the flat indices of A (left),
    B (above), C (above-left) clamped to 0, "first column" (predict B) and
    "interior" (choose by the edge test). Also the start offset of each diagonal."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    order = np.lexsort((r, r + c))[1:]
    r, c = r[order], c[order]
    x = r * cols + c
    table = np.stack([x, np.maximum(x - 1, 0), np.maximum(x - cols, 0), np.maximum(x - cols - 1, 0),
                      c == 0, (r > 0) & (c > 0)]).astype(np.int64)
    return table, np.searchsorted(r + c, np.arange(1, rows + cols)).tolist()


def _wavefront_pred2d(similar: _PairTest, rows: int, cols: int) -> np.ndarray:
    """pred2d with tracking, one anti-diagonal (r + c = k) per step: a block's
    neighbours A, B, C all lie on earlier diagonals. Each step tests C~A, C~B,
    X~A, X~B for the whole diagonal at once (on reconstructions: source indices)."""
    src = np.arange(rows * cols)
    keep = np.zeros(rows * cols, dtype=bool)
    keep[0] = True
    table, starts = diagonal_table(rows, cols)
    for start, stop in zip(starts[:-1], starts[1:]):
        x, left, up, corner, first_col, interior = table[:, start:stop]
        a, b, c = src[left], src[up], src[corner]
        sims = similar(np.concatenate([c, c, x, x]), np.concatenate([a, b, a, b])).reshape(4, -1)
        use_b = (sims[0] & ~sims[1] & interior.astype(bool)) | first_col.astype(bool)
        dropped = np.where(use_b, sims[3], sims[2])
        src[x] = np.where(dropped, np.where(use_b, b, a), x)
        keep[x] = ~dropped
    return keep


def _anchor_scan(similar: _PairTest, order: np.ndarray) -> np.ndarray:
    """1-D scan with tracking: blocks after a kept block (the anchor) are dropped
    while within tau of it; runs are tested in growing vectorised chunks."""
    keep = np.zeros(order.size, dtype=bool)
    keep[order[0]] = True
    anchor, pos, chunk = order[0], 0, 8  # pos: last scan position decided
    while pos < order.size - 1:
        candidates = order[pos + 1:pos + 1 + chunk]
        miss = np.flatnonzero(~similar(candidates, np.full(candidates.size, anchor)))
        if miss.size == 0:
            pos += candidates.size
            chunk *= 2
            continue
        pos += 1 + int(miss[0])
        anchor = order[pos]
        keep[anchor] = True
        chunk = max(8, 2 * (int(miss[0]) + 1))
    return keep
