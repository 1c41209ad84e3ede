"""select_blocks_torch gives the numpy select_blocks masks (CPU tensors here;
the same device-agnostic code runs on the GPU in the service)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelprune.selectors import METHODS, METRICS, select_blocks
from pixelprune.model.selectors_torch import select_blocks_torch
from pixelprune_testlib import planted_image

TAUS = (0.0, 0.02, 0.05)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The wavefront runs many small ops: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def check_same(pixels: np.ndarray, method: str, metric: str, tau: float) -> None:
    got = select_blocks_torch(torch.from_numpy(pixels.copy()), method, metric, tau)
    assert got.dtype == torch.bool and got.device.type == "cpu"
    np.testing.assert_array_equal(got.numpy(), select_blocks(pixels, method, metric, tau),
                                  err_msg=f"{method} {metric} {tau}")


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 6), cols=st.integers(1, 6),
       method=st.sampled_from(METHODS), metric=st.sampled_from(METRICS), tau=st.sampled_from(TAUS))
def test_random_grids_match_numpy(seed, rows, cols, method, metric, tau):
    check_same(planted_image(seed, rows, cols), method, metric, tau)


@pytest.mark.parametrize("name", ["desktop_pcmanfm_xterm_mousepad_1920x1080.png",
                                  "mobile_flask_quickstart_1170x2532.png"])
def test_corpus_images_match_numpy(corpus_dir, name):
    image = np.asarray(Image.open(corpus_dir / name).convert("RGB"))
    pixels = np.ascontiguousarray(image[:image.shape[0] // 32 * 32, :image.shape[1] // 32 * 32])
    for method in METHODS:
        for metric in METRICS:
            for tau in TAUS:
                check_same(pixels, method, metric, tau)


def test_hand_made_vertical_edge_and_degenerate():
    grey = {0: 40, 1: 200}
    labels = [[0, 1, 1]] * 3
    pixels = np.concatenate([np.concatenate([np.full((32, 32, 3), grey[v], np.uint8) for v in row], 1)
                             for row in labels], 0)
    expected = [[True, True, False], [False, False, False], [False, False, False]]
    for tau in TAUS:
        assert select_blocks_torch(torch.from_numpy(pixels), tau=tau).tolist() == expected
    assert select_blocks_torch(torch.zeros((32, 32, 3), dtype=torch.uint8)).tolist() == [[True]]


def test_huge_tau_keeps_only_the_anchor():
    pixels = torch.from_numpy(planted_image(9, 3, 2))
    for method in METHODS:
        for metric in METRICS:
            assert select_blocks_torch(pixels, method, metric, 1e300).tolist() == [[True, False], [False, False],
                                                                                    [False, False]]


def test_non_contiguous_tensor():
    pixels = planted_image(3, 3, 4)
    tensor = torch.from_numpy(np.pad(pixels, ((0, 0), (0, 64), (0, 0))))[:, :128]
    assert not tensor.is_contiguous()
    for tau in TAUS:
        np.testing.assert_array_equal(select_blocks_torch(tensor, "pred2d", "mae", tau).numpy(),
                                      select_blocks(pixels, "pred2d", "mae", tau))


def test_contiguous_view_at_an_odd_byte_offset():
    pixels = planted_image(5, 2, 3)
    flat = torch.zeros(pixels.size + 5, dtype=torch.uint8)
    tensor = flat[5:].view(pixels.shape)  # e.g. pixels after a 5-byte header in one buffer
    tensor.copy_(torch.from_numpy(pixels))
    assert tensor.is_contiguous() and tensor.storage_offset() == 5
    for method in METHODS:
        for tau in TAUS:
            np.testing.assert_array_equal(select_blocks_torch(tensor, method, "max", tau).numpy(),
                                          select_blocks(pixels, method, "max", tau))


@pytest.mark.parametrize("pixels, kwargs, message", [
    (torch.zeros((64, 64, 3), dtype=torch.float32), {}, "uint8"),
    (torch.zeros((64, 64), dtype=torch.uint8), {}, "shape"),
    (torch.zeros((64, 40, 3), dtype=torch.uint8), {}, "multiples of 32"),
    (np.zeros((64, 64, 3), np.uint8), {}, "torch"),
    (torch.zeros((64, 64, 3), dtype=torch.uint8), {"method": "spiral"}, "unknown method"),
    (torch.zeros((64, 64, 3), dtype=torch.uint8), {"metric": "rmse"}, "unknown metric"),
    (torch.zeros((64, 64, 3), dtype=torch.uint8), {"tau": -1.0}, "tau must be"),
    (torch.zeros((64, 64, 3), dtype=torch.uint8), {"tau": float("nan")}, "tau must be"),
])
def test_bad_input(pixels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_blocks_torch(pixels, **kwargs)
