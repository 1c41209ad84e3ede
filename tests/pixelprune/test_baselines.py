"""Baselines at a fixed token budget: random, connected components, resize."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from pixelprune.baselines import (
    apportion, block_components, conncomp_keep, random_keep, resize_baseline, resize_keep,
)


def blocks_image(layout: list[str], colours: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """uint8 image whose 32x32 block (r, c) is filled with colours[layout[r][c]]."""
    grid = np.array([[colours[ch] for ch in row] for row in layout], dtype=np.uint8)
    return np.repeat(np.repeat(grid, 32, axis=0), 32, axis=1)


COLOURS = {"w": (255, 255, 255), "k": (0, 0, 0), "r": (200, 30, 30), "b": (30, 30, 200)}


# --- random ---------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, 1, 7, 12])
def test_random_keep_meets_budget_exactly(budget):
    keep = random_keep((3, 4), budget, seed=5)
    assert keep.dtype == np.bool_ and keep.shape == (3, 4) and int(keep.sum()) == budget


def test_random_keep_seeded():
    a, b = random_keep((20, 30), 100, seed=1), random_keep((20, 30), 100, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, random_keep((20, 30), 100, seed=2))


@pytest.mark.parametrize("budget", [-1, 13, 2.5, True])
def test_random_keep_bad_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        random_keep((3, 4), budget)


def test_random_keep_bad_grid():
    with pytest.raises(ValueError, match="grid shape"):
        random_keep((0, 4), 0)


# --- connected components -----------------------------------------------------------------

def slow_components(pixels: np.ndarray, metric: str, tau: float) -> np.ndarray:
    """BFS over blocks; label = raster index of the component's first block."""
    h, w = pixels.shape[0] // 32, pixels.shape[1] // 32
    blocks = [[pixels[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].astype(float) / 255 for c in range(w)]
              for r in range(h)]

    def similar(a, b):
        diff = np.abs(a - b)
        return (diff.max() if metric == "max" else diff.mean()) <= tau

    labels = -np.ones((h, w), dtype=np.int64)
    for r0 in range(h):
        for c0 in range(w):
            if labels[r0, c0] >= 0:
                continue
            labels[r0, c0] = r0 * w + c0
            queue = deque([(r0, c0)])
            while queue:
                r, c = queue.popleft()
                for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= rr < h and 0 <= cc < w and labels[rr, cc] < 0 and similar(blocks[r][c], blocks[rr][cc]):
                        labels[rr, cc] = r0 * w + c0
                        queue.append((rr, cc))
    return labels


def test_components_hand_made_grid():
    layout = ["wwkk",
              "wkkw",
              "rrbw",
              "wrbw"]
    labels = block_components(blocks_image(layout, COLOURS))
    expected = np.array([[0, 0, 2, 2],
                         [0, 2, 2, 7],
                         [8, 8, 10, 7],
                         [12, 8, 10, 7]])
    assert np.array_equal(labels, expected)


def test_components_snake_needs_many_merges():
    # one white component that winds through the whole grid
    layout = ["wwwwwww",
              "kkkkkkw",
              "wwwwwww",
              "wkkkkkk",
              "wwwwwww"]
    labels = block_components(blocks_image(layout, COLOURS))
    assert np.array_equal(labels, slow_components(blocks_image(layout, COLOURS), "max", 0.0))
    assert set(np.unique(labels)) == {0, 7, 22}


@pytest.mark.parametrize("metric, tau", [("max", 0.0), ("max", 0.05), ("mae", 0.02), ("mae", 0.2)])
def test_components_match_slow_reference(metric, tau):
    rng = np.random.default_rng(3)
    palette = np.array([[255, 255, 255], [250, 252, 255], [240, 240, 240], [0, 0, 0], [10, 200, 30]], np.uint8)
    grid = palette[rng.integers(0, len(palette), (7, 9))]
    pixels = np.repeat(np.repeat(grid, 32, 0), 32, 1)
    pixels[5:9, 40:44] = 128  # a small detail inside one block makes it differ from its neighbours
    assert np.array_equal(block_components(pixels, metric, tau), slow_components(pixels, metric, tau))


def test_components_tau_joins_near_equal_blocks():
    pixels = blocks_image(["ww"], COLOURS)
    pixels[:, 32:] = 250  # 5 levels below white: max distance 5/255 = 0.0196
    assert block_components(pixels, "max", 0.0).tolist() == [[0, 1]]
    assert block_components(pixels, "max", 0.02).tolist() == [[0, 0]]
    assert block_components(pixels, "max", 0.019).tolist() == [[0, 1]]


def test_components_bad_arguments():
    pixels = blocks_image(["ww"], COLOURS)
    with pytest.raises(ValueError, match="metric"):
        block_components(pixels, "l2", 0.0)
    with pytest.raises(ValueError, match="tau"):
        block_components(pixels, "max", -0.1)
    with pytest.raises(ValueError, match="multiples of 32"):
        block_components(pixels[:, :40], "max", 0.0)


def test_apportion_largest_remainder():
    # budget >= 4 components: one each, the spare 3 shared by size-1 = [5, 2, 1, 0] (sum 8):
    # quotas 15/8, 6/8, 3/8, 0 -> floors [1, 0, 0, 0], remainders 7, 6, 3, 0 -> +1 to the first two
    assert apportion(np.array([6, 3, 2, 1]), 7).tolist() == [3, 2, 1, 1]
    assert apportion(np.array([6, 3, 2, 1]), 4).tolist() == [1, 1, 1, 1]
    assert apportion(np.array([6, 3, 2, 1]), 12).tolist() == [6, 3, 2, 1]
    # budget < components: shares of 2 in proportion to size 5/8, 1/8, ...: quotas 1.25, .25, .25, .25
    # -> floor 1 for the first, then the remainders tie and the first component wins
    assert apportion(np.array([5, 1, 1, 1]), 2).tolist() == [2, 0, 0, 0]
    assert apportion(np.array([1, 1, 1]), 2).tolist() == [1, 1, 0]
    assert apportion(np.array([4, 4]), 0).tolist() == [0, 0]


def test_apportion_invariants():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(1, 30, rng.integers(1, 12))
        budget = int(rng.integers(0, sizes.sum() + 1))
        shares = apportion(sizes, budget)
        assert shares.sum() == budget and (shares <= sizes).all() and (shares >= 0).all()
        if budget >= sizes.size:
            assert (shares >= 1).all()


def test_conncomp_keep_first_blocks_of_each_component():
    layout = ["wwkk",
              "wkkw",
              "rrbw",
              "wrbw"]
    pixels = blocks_image(layout, COLOURS)
    # components (raster order of first block): w0 {0,1,4} size 3, k {2,3,5,6} 4, w7 {7,11,15} 3,
    # r {8,9,13} 3, b {10,14} 2, w12 {12} 1 -> C = 6; budget 9: spare 3 over size-1 = [2,3,2,2,1,0]
    # (sum 10): quotas .6 .9 .6 .6 .3 0 -> floors 0; remainders 6, 9, 6, 6, 3 -> k, w0, w7
    keep = conncomp_keep(pixels, 9)
    expected = np.zeros(16, dtype=bool)
    expected[[0, 1, 2, 3, 7, 11, 8, 10, 12]] = True
    assert np.array_equal(keep.reshape(-1), expected)


@pytest.mark.parametrize("budget", [0, 1, 5, 6, 13, 16])
def test_conncomp_keep_budget_exact(budget):
    pixels = blocks_image(["wwkk", "wkkw", "rrbw", "wrbw"], COLOURS)
    keep = conncomp_keep(pixels, budget)
    assert keep.shape == (4, 4) and int(keep.sum()) == budget


def test_conncomp_every_component_kept_at_pixelprune_budget(corpus_dir):
    from pixelprune.selectors import select_blocks
    from pixelprune.stats import load_image

    _, pixels = load_image(corpus_dir / "web_python_tutorial_classes_1920x1080.png")
    budget = int(select_blocks(pixels).sum())
    labels = block_components(pixels)
    keep = conncomp_keep(pixels, budget)
    assert int(keep.sum()) == budget
    assert set(np.unique(labels[keep])) == set(np.unique(labels))  # at tau = 0, K >= #components


def test_conncomp_bad_budget():
    with pytest.raises(ValueError, match="budget"):
        conncomp_keep(blocks_image(["ww"], COLOURS), 3)


# --- resize ---------------------------------------------------------------------------

def test_resize_keep_hand_computed():
    # 3840x2176 (120x68 blocks), aspect 1.7647: 34 rows -> 60 cols = 2040 <= 2138; 35 -> 62 = 2170 > 2138
    assert resize_keep((3840, 2176), 2138) == (1920, 1088)
    assert resize_keep((320, 320), 12) == (96, 96)  # 3x3; 4x4 = 16 does not fit
    assert resize_keep((320, 320), 100) == (320, 320)  # the whole image fits
    assert resize_keep((1184, 2528), 1) == (32, 32)
    # 1x3 aspect: 1 row -> 3 cols (3 blocks); budget 5 still only fits one row
    assert resize_keep((96 * 4, 32 * 4), 5) == (96, 32)
    # too small a budget for one aspect-matched row (3 blocks): one row of `budget` blocks
    assert resize_keep((96 * 4, 32 * 4), 2) == (64, 32)
    assert resize_keep((3840, 2176), 1) == (32, 32)


def test_resize_keep_bad_arguments():
    with pytest.raises(ValueError, match="at least 1 block"):
        resize_keep((320, 320), 0)
    with pytest.raises(ValueError, match="budget"):
        resize_keep((320, 320), 101)
    with pytest.raises(ValueError, match="at least 32x32"):
        resize_keep((20, 320), 1)


def test_resize_baseline_output():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2176 // 4, 3840 // 4, 3), dtype=np.uint8)  # 960x544: 30x17 blocks
    small, (w, h) = resize_baseline(pixels, 120)
    assert small.dtype == np.uint8 and small.shape == (h, w, 3)
    assert (w // 32) * (h // 32) <= 120 and w % 32 == 0 and h % 32 == 0
    assert (w, h) == (448, 256)  # 8 rows -> round(14.1) = 14 cols = 112; 9 rows -> 16 cols = 144 > 120
