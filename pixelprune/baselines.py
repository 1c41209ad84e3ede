"""Baselines the paper compares PixelPrune against, at the same token budget.

The budget K is a per-image block count, normally what PixelPrune keeps on
that image. Each baseline spends exactly K visual tokens (the resize baseline
at most K, as close as the 32-px grid allows):

- `random_keep`: K blocks chosen uniformly at random.
- `conncomp_keep` (ShowUI-style): blocks joined into connected components
  when 4-neighbours are similar; every component keeps a share of its blocks.
- `resize_baseline`: the whole image downscaled so that its block grid has at
  most K blocks (aspect ratio kept up to the 32-px rounding).

Pure numpy; no I/O.
"""

from __future__ import annotations

import math

import numpy as np

from pixelprune.geometry import BLOCK_SIZE, block_view, check_pixels, resize_to
from pixelprune.selectors import threshold_units


def _check_budget(budget: int, total: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"budget must be an integer block count, got {budget!r}")
    if not 0 <= budget <= total:
        raise ValueError(f"budget must be within [0, {total}] blocks, got {budget}")
    return int(budget)


def random_keep(grid_shape: tuple[int, int], budget: int, seed: int | None = 0) -> np.ndarray:
    """bool (h, w) with exactly `budget` True cells, uniformly at random
    (numpy's default_rng(seed); the same seed gives the same mask)."""
    h, w = (int(v) for v in grid_shape)
    if h <= 0 or w <= 0:
        raise ValueError(f"grid shape must be positive, got {grid_shape}")
    budget = _check_budget(budget, h * w)
    keep = np.zeros(h * w, dtype=bool)
    keep[np.random.default_rng(seed).choice(h * w, size=budget, replace=False)] = True
    return keep.reshape(h, w)


def _similar_neighbours(pixels: np.ndarray, metric: str, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(h, w-1) right-neighbour and (h-1, w) down-neighbour similarity of
    32x32 blocks, with the selectors' own integer form of `dist <= tau` on
    [0, 1] pixel values (`max`: largest absolute difference; `mae`: mean)."""
    thr = threshold_units("pred2d", metric, tau)  # validates metric and tau
    blocks = block_view(pixels)
    h, w = blocks.shape[:2]
    flat = np.ascontiguousarray(blocks).reshape(h, w, -1)  # one row of 3072 bytes per block
    if thr == 0:  # exact equality; compare 8 bytes at a time
        words = flat.view(np.uint64)
        return ((words[:, 1:] == words[:, :-1]).all(-1), (words[1:] == words[:-1]).all(-1))

    def within(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        diff = np.maximum(a, b)
        diff -= np.minimum(a, b)  # |a - b| without leaving uint8
        return (diff.max(-1) if metric == "max" else diff.sum(-1, dtype=np.uint32)) <= thr

    return within(flat[:, 1:], flat[:, :-1]), within(flat[1:], flat[:-1])


def block_components(pixels: np.ndarray, metric: str = "max", tau: float = 0.0) -> np.ndarray:
    """int64 (h, w) component label per block: blocks are joined when they are
    4-neighbours with distance <= tau (exact equality at tau = 0); the label of
    a component is the raster index of its first block.

    Union-find, vectorised: each round hooks the larger root of every edge onto
    the smaller one, then compresses paths fully. Roots only ever point to
    smaller indices, so there are no cycles; it stops when no edge joins two roots."""
    right, down = _similar_neighbours(pixels, metric, tau)
    h, w = right.shape[0], down.shape[1]
    index = np.arange(h * w, dtype=np.int64).reshape(h, w)
    u = np.concatenate([index[:, :-1][right], index[:-1][down]])
    v = np.concatenate([index[:, 1:][right], index[1:][down]])
    parent = np.arange(h * w, dtype=np.int64)
    while True:
        ru, rv = parent[u], parent[v]
        joined = ru != rv
        if not joined.any():
            return parent.reshape(h, w)
        np.minimum.at(parent, np.maximum(ru, rv)[joined], np.minimum(ru, rv)[joined])
        while True:  # full path compression: every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def apportion(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Blocks to keep per component, summing to exactly `budget`.

    Rule (Hamilton / largest remainder):
    - budget >= number of components C: every component keeps one block, and
      the other budget - C are shared in proportion to (size - 1), floors
      first, then one more each to the largest remainders; a component never
      gets more than its size.
    - budget < C: shares in proportion to size, by largest remainder (some
      components then keep nothing).
    Ties go to the component that comes first (its first block in raster order).
    At tau = 0 PixelPrune always keeps the first raster block of every
    component (its left and upper neighbours lie outside it), so a budget taken
    from PixelPrune is always >= C and the first rule applies.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    budget = _check_budget(budget, int(sizes.sum()))
    base = np.zeros_like(sizes)
    weights = sizes
    if budget >= sizes.size:
        base = np.ones_like(sizes)
        weights = sizes - 1
    spare = budget - int(base.sum())
    if spare == 0:
        return base
    quota = weights * spare  # exact integer arithmetic: quota / weights.sum() is the share
    share = quota // weights.sum()
    remainder = quota - share * weights.sum()
    extra = spare - int(share.sum())
    order = np.lexsort((np.arange(sizes.size), -remainder))  # largest remainder, then first
    share[order[:extra]] += 1
    return base + share


def conncomp_keep(pixels: np.ndarray, budget: int, metric: str = "max", tau: float = 0.0) -> np.ndarray:
    """bool (h, w) with exactly `budget` True blocks, spread over the connected
    components of similar blocks (see `block_components`) by `apportion`; each
    component keeps its first blocks in raster order."""
    labels = block_components(pixels, metric, tau).reshape(-1)
    budget = _check_budget(budget, labels.size)
    order = np.argsort(labels, kind="stable")  # grouped by component, raster order inside
    roots, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    shares = apportion(sizes, budget)
    rank = np.arange(labels.size) - np.repeat(starts, sizes)  # position inside the component
    keep = np.zeros(labels.size, dtype=bool)
    keep[order[rank < np.repeat(shares, sizes)]] = True
    h, w = pixels.shape[0] // BLOCK_SIZE, pixels.shape[1] // BLOCK_SIZE
    return keep.reshape(h, w)


def resize_keep(image_size: tuple[int, int], budget: int) -> tuple[int, int]:
    """(width, height), multiples of 32, of the downscaled image with at most
    `budget` blocks, as many as possible: the largest block-row count r whose
    aspect-matched column count c = round(r * W / H) (at least 1) still fits
    r * c <= budget. The original size (rounded down to whole blocks) caps it,
    so an image that already fits is returned at its own grid. A budget too
    small for even one aspect-matched row gets one row of `budget` blocks."""
    width, height = (int(v) for v in image_size)
    if width < BLOCK_SIZE or height < BLOCK_SIZE:
        raise ValueError(f"image must be at least {BLOCK_SIZE}x{BLOCK_SIZE} px, got {width}x{height} (WxH)")
    rows_max, cols_max = height // BLOCK_SIZE, width // BLOCK_SIZE
    budget = _check_budget(budget, rows_max * cols_max)
    if budget == 0:
        raise ValueError("the resize baseline needs a budget of at least 1 block")
    aspect = width / height
    candidates = []
    for rows in range(1, rows_max + 1):
        cols = min(cols_max, max(1, round(rows * aspect)))
        if rows * cols <= budget:  # most blocks first, then the closest aspect ratio
            candidates.append((rows * cols, -abs(math.log(cols / rows / aspect)), rows, cols))
    _, _, rows, cols = max(candidates, default=(0, 0, 1, min(budget, cols_max)))
    return cols * BLOCK_SIZE, rows * BLOCK_SIZE


def resize_baseline(pixels: np.ndarray, budget: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The image downscaled (processor-style bicubic) to `resize_keep`'s size:
    returns (uint8 (h', w', 3), (w', h')); every block of it is a visual token."""
    check_pixels(pixels)
    width, height = resize_keep((pixels.shape[1], pixels.shape[0]), budget)
    return resize_to(pixels, height, width), (width, height)
