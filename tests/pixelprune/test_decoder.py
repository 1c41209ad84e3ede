"""reconstruct(): exact at tau = 0 (Proposition 1), within tau at tau > 0
(Proposition 2), and why the encoder has to track the decoder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelprune.decoder import reconstruct
from pixelprune.geometry import block_view
from pixelprune.selectors import METHODS, METRICS, select_blocks
from pixelprune_testlib import planted_image


def encode_decode(pixels, method, metric, tau, keep=None):
    keep = select_blocks(pixels, method, metric, tau) if keep is None else keep
    return keep, reconstruct(block_view(pixels)[keep], keep, method, metric, tau)


def block_errors(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Per-block distance in [0, 1] units."""
    diff = np.abs(block_view(a).astype(np.float64) - block_view(b)) / 255
    return diff.max(axis=(2, 3, 4)) if metric == "max" else diff.mean(axis=(2, 3, 4))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 6), cols=st.integers(1, 6),
       method=st.sampled_from(METHODS), metric=st.sampled_from(METRICS))
def test_exact_reconstruction_at_tau_zero(seed, rows, cols, method, metric):
    pixels = planted_image(seed, rows, cols)
    keep, rebuilt = encode_decode(pixels, method, metric, 0.0)
    assert rebuilt.dtype == np.uint8
    np.testing.assert_array_equal(rebuilt, pixels)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 6), cols=st.integers(1, 6),
       method=st.sampled_from(METHODS), metric=st.sampled_from(METRICS),
       tau=st.sampled_from([0.01, 0.02, 0.03, 0.05, 0.1]))
def test_every_block_within_tau(seed, rows, cols, method, metric, tau):
    pixels = planted_image(seed, rows, cols)
    keep, rebuilt = encode_decode(pixels, method, metric, tau)
    errors = block_errors(rebuilt, pixels, metric)
    assert (errors <= tau).all()
    assert (errors[keep] == 0).all()


def load_cropped(path) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB"))
    return image[:image.shape[0] // 32 * 32, :image.shape[1] // 32 * 32]


def test_corpus_images(corpus_dir, corpus_manifest):
    for entry in corpus_manifest:
        pixels = load_cropped(corpus_dir / entry["file"])
        for method in METHODS:
            _, rebuilt = encode_decode(pixels, method, "max", 0.0)
            np.testing.assert_array_equal(rebuilt, pixels, err_msg=f"{entry['file']} {method}")
        for metric, tau in (("max", 0.05), ("mae", 0.02)):
            _, rebuilt = encode_decode(pixels, "pred2d", metric, tau)
            assert block_errors(rebuilt, pixels, metric).max() <= tau, entry["file"]


def naive_select(pixels: np.ndarray, tau: float) -> np.ndarray:
    """The wrong encoder: raster scan comparing each block with its ORIGINAL predecessor."""
    blocks = block_view(pixels).reshape(-1, 32, 32, 3).astype(np.int64)
    keep = np.ones(len(blocks), dtype=bool)
    for i in range(1, len(blocks)):
        keep[i] = np.abs(blocks[i] - blocks[i - 1]).max() > tau * 255
    return keep.reshape(block_view(pixels).shape[:2])


def test_naive_encoder_accumulates_error_tracking_does_not():
    """Greys 0, 4, 8, ..., 36 in one row, max, tau = 0.02 (5 levels). Each block is
    within tau of its neighbour, so the naive encoder keeps only the first block and
    the decoder fills the row with 0: the last block ends 36 levels (0.14) away.
    The tracking encoder compares with what the decoder has, and stays within tau."""
    pixels = np.concatenate([np.full((32, 32, 3), 4 * k, np.uint8) for k in range(10)], axis=1)
    naive_keep = naive_select(pixels, 0.02)
    assert naive_keep.tolist() == [[True] + [False] * 9]
    _, naive_rebuilt = encode_decode(pixels, "raster", "max", 0.02, keep=naive_keep)
    naive_errors = block_errors(naive_rebuilt, pixels, "max")
    assert naive_errors.max() == pytest.approx(36 / 255)
    keep, rebuilt = encode_decode(pixels, "raster", "max", 0.02)
    assert keep.tolist() == [[True, False] * 5]  # 0 kept, 4 -> 0, 8 kept, 12 -> 8, ...
    assert block_errors(rebuilt, pixels, "max").max() == pytest.approx(4 / 255)


def test_pred2d_decoder_hand_made():
    """The vertical-edge grid: only two blocks are sent, the decoder rebuilds all 9."""
    columns = [np.full((32, 32, 3), grey, np.uint8) for grey in (40, 200, 200)]
    pixels = np.concatenate([np.concatenate(columns, axis=1)] * 3, axis=0)
    keep = np.array([[True, True, False], [False] * 3, [False] * 3])
    np.testing.assert_array_equal(select_blocks(pixels), keep)
    np.testing.assert_array_equal(reconstruct(block_view(pixels)[keep], keep), pixels)


@pytest.mark.parametrize("blocks, keep, kwargs, message", [
    (np.zeros((1, 32, 32, 3), np.uint8), np.array([[False, True]]), {}, "top-left"),
    (np.zeros((2, 32, 32, 3), np.uint8), np.array([[True, False]]), {}, "one block per True"),
    (np.zeros((1, 32, 32, 3), np.float32), np.array([[True]]), {}, "uint8"),
    (np.zeros((1, 16, 16, 3), np.uint8), np.array([[True]]), {}, "uint8"),
    (np.zeros((1, 32, 32, 3), np.uint8), np.array([[1]]), {}, "bool"),
    (np.zeros((1, 32, 32, 3), np.uint8), np.array([[True]]), {"method": "snake"}, "unknown method"),
    (np.zeros((1, 32, 32, 3), np.uint8), np.array([[True]]), {"tau": -0.5}, "tau must be"),
])
def test_bad_input(blocks, keep, kwargs, message):
    with pytest.raises(ValueError, match=message):
        reconstruct(blocks, keep, **kwargs)
