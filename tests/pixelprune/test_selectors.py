"""select_blocks against a slow, obvious per-block implementation of
ALGORITHM.md (float [0, 1] pixels, reconstruction tracking), against the paper
authors' keep sets on the shared corpus, and on hand-made grids."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelprune import selectors
from pixelprune.selectors import METHODS, METRICS, select_blocks, threshold_units
from pixelprune_testlib import planted_image

TAUS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1)  # none is k/255 (or k/(255*3072)): no ties
BACKENDS = ("numba", "numpy")


# ------------------------------------------------------------ slow reference
def _dist(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    diff = np.abs(a.astype(np.float64) / 255 - b.astype(np.float64) / 255)
    return float(diff.max() if metric == "max" else diff.mean())


def slow_select(pixels: np.ndarray, method: str, metric: str, tau: float) -> np.ndarray:
    """One block at a time. `rec` holds what a decoder rebuilds: a dropped block
    takes its prediction's pixels, and later predictions read `rec`."""
    rows, cols = pixels.shape[0] // 32, pixels.shape[1] // 32
    block = {(r, c): pixels[32 * r:32 * r + 32, 32 * c:32 * c + 32] for r in range(rows) for c in range(cols)}
    similar = lambda a, b: _dist(a, b, metric) <= tau  # noqa: E731
    keep = np.zeros((rows, cols), dtype=bool)
    rec = {}
    if method == "pred2d":
        order = [(r, c) for r in range(rows) for c in range(cols)]
    else:
        order = [(r, c) for r in range(rows)
                 for c in (range(cols) if method == "raster" or r % 2 == 0 else reversed(range(cols)))]
    for n, (r, c) in enumerate(order):
        if n == 0:
            keep[r, c], rec[r, c] = True, block[r, c]
            continue
        if method != "pred2d":
            pred = rec[order[n - 1]]
        elif r == 0:
            pred = rec[r, c - 1]
        elif c == 0:
            pred = rec[r - 1, c]
        else:
            a, b, corner = rec[r, c - 1], rec[r - 1, c], rec[r - 1, c - 1]
            pred = b if similar(corner, a) and not similar(corner, b) else a
        if similar(block[r, c], pred):
            rec[r, c] = pred
        else:
            keep[r, c], rec[r, c] = True, block[r, c]
    return keep


def run_backend(pixels, method, metric, tau, backend):
    """The mask from one implementation path (tau = 0 has only the vectorised one)."""
    thr = threshold_units(method, metric, tau)
    if thr == 0 or pixels.shape[0] * pixels.shape[1] == 1024:
        return select_blocks(pixels, method, metric, tau)
    pixels = np.ascontiguousarray(pixels)
    if backend == "numpy":
        return selectors._track_numpy(pixels, method, metric == "max", thr)
    if not selectors._numba_kernels():
        pytest.skip("numba is not installed")
    return selectors._track_numba(pixels, method, metric == "max", thr)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), cols=st.integers(1, 6),
       method=st.sampled_from(METHODS), metric=st.sampled_from(METRICS), tau=st.sampled_from(TAUS))
def test_fast_paths_equal_slow_reference(seed, rows, cols, method, metric, tau):
    pixels = planted_image(seed, rows, cols)
    expected = slow_select(pixels, method, metric, tau)
    for backend in BACKENDS:
        got = run_backend(pixels, method, metric, tau, backend)
        assert got.dtype == np.bool_ and got.shape == (rows, cols)
        np.testing.assert_array_equal(got, expected, err_msg=f"{backend} {method} {metric} {tau}")


# ------------------------------------------------------------ hand-made grids
def grid_image(labels: list[list[int]], colours: dict[int, int]) -> np.ndarray:
    """Uniform blocks: label -> grey level."""
    rows = [np.concatenate([np.full((32, 32, 3), colours[v], np.uint8) for v in row], axis=1) for row in labels]
    return np.concatenate(rows, axis=0)


VERTICAL_EDGE = [[0, 1, 1], [0, 1, 1], [0, 1, 1]]
HORIZONTAL_EDGE = [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
T, F = True, False


@pytest.mark.parametrize("labels, method, expected", [
    # (1, 1): A = 0, B = 1, C = 0: C ~ A and not C ~ B -> predict B (the edge is vertical).
    (VERTICAL_EDGE, "pred2d", [[T, T, F], [F, F, F], [F, F, F]]),
    (VERTICAL_EDGE, "raster", [[T, T, F], [T, T, F], [T, T, F]]),
    (VERTICAL_EDGE, "serpentine", [[T, T, F], [T, F, F], [F, T, F]]),
    (HORIZONTAL_EDGE, "pred2d", [[T, F, F], [T, F, F], [F, F, F]]),
    (HORIZONTAL_EDGE, "raster", [[T, F, F], [T, F, F], [F, F, F]]),
    (HORIZONTAL_EDGE, "serpentine", [[T, F, F], [F, F, T], [F, F, F]]),
])
def test_hand_made_masks(labels, method, expected):
    pixels = grid_image(labels, {0: 40, 1: 200})
    for metric in METRICS:
        for tau in (0.0, 0.05):
            for backend in BACKENDS:
                np.testing.assert_array_equal(run_backend(pixels, method, metric, tau, backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_tracking_keeps_the_end_of_a_near_equal_chain(method, backend):
    """Grey 0, 4, 8 in one row, max, tau = 0.02 (5 levels): 4 is within tau of 0
    and is dropped (rebuilt as 0); 8 is compared with that 0, not with 4: kept."""
    pixels = grid_image([[0, 1, 2]], {0: 0, 1: 4, 2: 8})
    np.testing.assert_array_equal(run_backend(pixels, method, "max", 0.02, backend), [[T, F, T]])
    np.testing.assert_array_equal(run_backend(pixels, method, "max", 0.04, backend), [[T, F, F]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pred2d_predicts_from_rebuilt_neighbours(backend):
    """Greys [[9, 8], [6, 3]], max, tau = 0.02 (5 levels). 8 and 6 are within tau
    of 9 and are dropped, both rebuilt as 9. At (1, 1) A = B = C = 9 (rebuilt), so
    3 is predicted by 9: kept. Comparing with originals (A = 6) would drop it and
    leave it 6 levels (> tau) away from what a decoder rebuilds."""
    pixels = grid_image([[9, 8], [6, 3]], {v: v for v in (9, 8, 6, 3)})
    np.testing.assert_array_equal(run_backend(pixels, "pred2d", "max", 0.02, backend), [[T, F], [F, T]])
    # With a vertical edge on rebuilt values: C = 0, A = 4 (rebuilt 0), B = 9 -> predict B.
    pixels = grid_image([[0, 9], [4, 9]], {v: v for v in (0, 4, 9)})
    np.testing.assert_array_equal(run_backend(pixels, "pred2d", "max", 0.02, backend), [[T, T], [F, F]])


def test_degenerate_grids():
    assert select_blocks(np.zeros((32, 32, 3), np.uint8)).tolist() == [[True]]
    for method in METHODS:
        assert select_blocks(np.zeros((32, 96, 3), np.uint8), method).tolist() == [[T, F, F]]
        assert select_blocks(np.zeros((96, 32, 3), np.uint8), method, "mae", 0.1).tolist() == [[T], [F], [F]]
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert select_blocks(noise).all()


def test_non_contiguous_input_and_fallback(monkeypatch):
    image = planted_image(7, 4, 5)
    view = np.pad(image, ((0, 0), (0, 32), (0, 0)))[:, :160]
    assert not view.flags.c_contiguous
    for tau in (0.0, 0.05):
        expected = select_blocks(image, "serpentine", "mae", tau)
        np.testing.assert_array_equal(select_blocks(view, "serpentine", "mae", tau), expected)
        monkeypatch.setattr(selectors, "_numba_kernels", lambda: False)
        np.testing.assert_array_equal(select_blocks(view, "serpentine", "mae", tau), expected)
        monkeypatch.undo()


def test_without_numba_installed():
    """`import numba` failing must leave the numpy/Pillow paths, with the same results."""
    code = """
import sys
if sys.argv[1] == "without":
    sys.modules["numba"] = None  # any `import numba` now raises ImportError
import numpy as np
from pixelprune import geometry, selectors
print(selectors._numba_kernels(), geometry._kernels() is not None)
rng = np.random.default_rng(0)
pixels = np.repeat(rng.integers(0, 256, (4, 5, 1, 1, 3), dtype=np.uint8), 32, 2).repeat(32, 3)
pixels = np.ascontiguousarray(pixels.transpose(0, 2, 1, 3, 4).reshape(128, 160, 3))
pixels[:, 64:] = pixels[:, :96] // 2 * 2
for method in selectors.METHODS:
    print(method, selectors.select_blocks(pixels, method, "max", 0.05).astype(int).tolist())
print(geometry.resize_to(pixels, 136, 160).sum())
"""
    runs = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                 check=True).stdout.splitlines() for mode in ("without", "with")}
    assert runs["without"][0] == "False False"
    assert runs["without"][1:] == runs["with"][1:] and len(runs["with"]) == 5


# ------------------------------------------------------------ authors' keep sets
CONFIGS = [("pred_2d", "exact", 0.0), ("raster", "exact", 0.0), ("serpentine", "exact", 0.0),
           ("pred_2d", "max", 0.02), ("pred_2d", "max", 0.05), ("pred_2d", "mae", 0.02)]


def load_cropped(path) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB"))
    return image[:image.shape[0] // 32 * 32, :image.shape[1] // 32 * 32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_keep_sets(corpus_dir, corpus_manifest, backend):
    reference = np.load(corpus_dir / "reference" / "keep_indices.npz")
    agree = total = 0
    for entry in corpus_manifest:
        pixels = load_cropped(corpus_dir / entry["file"])
        for name, metric, tau in CONFIGS:
            expected = np.zeros(pixels.shape[0] // 32 * (pixels.shape[1] // 32), dtype=bool)
            expected[reference[f"{entry['file']}|{name}:{metric}:{tau}"]] = True
            method = name.replace("_", "")
            got = run_backend(pixels, method, "max" if metric == "exact" else metric, tau, backend).reshape(-1)
            same = int((got == expected).sum())
            if tau == 0:
                assert same == got.size, f"{entry['file']} {name}:{metric}:{tau}"
            assert same >= 0.999 * got.size, f"{entry['file']} {name}:{metric}:{tau}: {same}/{got.size}"
            agree, total = agree + same, total + got.size
    print(f"block agreement with the authors' keep sets ({backend}): {agree}/{total} = {agree / total:.6f}")


# ------------------------------------------------------------ thresholds and errors
def test_threshold_units():
    assert threshold_units("pred2d", "max", 0.02) == 5
    assert threshold_units("pred2d", "max", 0.05) == 12
    assert threshold_units("pred2d", "max", 2 / 255) == 2
    assert threshold_units("pred2d", "mae", 0.02) == 15667  # 0.02 * 255 * 3072 = 15667.2
    assert threshold_units("raster", "mae", 0) == 0
    assert threshold_units("raster", "max", 1.0) == 255
    assert threshold_units("raster", "max", 1e300) == 255  # capped: every block is similar
    assert threshold_units("raster", "mae", 1e300) == 255 * 3072
    assert threshold_units("raster", "mae", 1.7e308) == 255 * 3072


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("metric", METRICS)
def test_huge_tau_keeps_only_the_anchor(method, metric):
    pixels = np.random.default_rng(5).integers(0, 256, (96, 64, 3), dtype=np.uint8)
    for backend in BACKENDS:
        assert run_backend(pixels, method, metric, 1e300, backend).tolist() == [[T, F], [F, F], [F, F]]


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "zigzag"}, "unknown method"),
    ({"method": "pred_2d"}, "unknown method"),
    ({"metric": "exact"}, "unknown metric"),
    ({"tau": -0.01}, "tau must be"),
    ({"tau": float("nan")}, "tau must be"),
    ({"tau": float("inf")}, "tau must be"),
    ({"tau": "0.1"}, "tau must be a number"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_blocks(np.zeros((64, 64, 3), np.uint8), **kwargs)


@pytest.mark.parametrize("pixels, message", [
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((64, 64), np.uint8), "shape"),
    (np.zeros((64, 64, 4), np.uint8), "shape"),
    (np.zeros((0, 64, 3), np.uint8), "empty"),
    (np.zeros((64, 48, 3), np.uint8), "multiples of 32"),
    (np.zeros((100, 64, 3), np.uint8), "multiples of 32"),
    ([[0, 0, 0]], "numpy"),
])
def test_bad_pixels(pixels, message):
    with pytest.raises(ValueError, match=message):
        select_blocks(pixels)
