"""Test inputs shared by the selector, torch-twin and decoder tests (a uniquely
named module, imported from the test folder that pytest puts on sys.path)."""

from __future__ import annotations

import numpy as np


def planted_image(seed: int, rows: int, cols: int) -> np.ndarray:
    """A uint8 (rows*32, cols*32, 3) image whose blocks are drawn from a few random
    blocks and their near copies (uniform offsets, sparse perturbations), plus copies
    and small ramps of the left / upper neighbour: exact and near repeats in every
    direction the predictors look."""
    rng = np.random.default_rng(seed)
    bases = [rng.integers(0, 256, (32, 32, 3)) for _ in range(rng.integers(1, 4))]
    bases.append(np.full((32, 32, 3), rng.integers(0, 256)))
    candidates = []
    for base in bases:
        sparse = rng.random((32, 32, 3)) < 0.05
        candidates += [base, base + rng.integers(-8, 9), base + sparse * rng.integers(-20, 21, (32, 32, 3))]
    grid = np.empty((rows, cols, 32, 32, 3), dtype=np.int64)
    for r in range(rows):
        for c in range(cols):
            roll = rng.random()
            if roll < 0.3 and c > 0:
                grid[r, c] = grid[r, c - 1] + rng.integers(0, 5)  # ramp / near repeat of the left block
            elif roll < 0.5 and r > 0:
                grid[r, c] = grid[r - 1, c]  # exact repeat of the upper block
            else:
                grid[r, c] = candidates[rng.integers(len(candidates))]
    image = np.clip(grid, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(0, 2, 1, 3, 4).reshape(rows * 32, cols * 32, 3))
