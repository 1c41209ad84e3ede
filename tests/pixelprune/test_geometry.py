"""Geometry against transformers' own Qwen2VLImageProcessorPil configured as Qwen3-VL."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixelprune import geometry
from pixelprune.geometry import (block_view, image_grid_thw, kept_patch_rows, kept_pixel_values, resize_to,
                                 smart_resize, to_original, to_resized)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def qwen3vl_processor(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                    image_mean=list(mean), image_std=list(std),
                                    size={"shortest_edge": 65536, "longest_edge": 16777216})


# (input W x H) -> (resized W x H, tokens): QWEN3VL.md section 5(c).
TABLE = [((512, 512), (512, 512), 256), ((1280, 720), (1280, 704), 880), ((1920, 1080), (1920, 1088), 2040),
         ((2560, 1440), (2560, 1440), 3600), ((3840, 2160), (3840, 2176), 8160),
         ((1170, 2532), (1184, 2528), 2923), ((200, 100), (384, 192), 72), ((48, 48), (256, 256), 64),
         ((5000, 5000), (4096, 4096), 16384)]


@pytest.mark.parametrize("size, resized, tokens", TABLE)
def test_smart_resize_table(size, resized, tokens):
    (width, height), (new_w, new_h) = size, resized
    assert smart_resize(height, width) == (new_h, new_w)
    assert (new_h // 32) * (new_w // 32) == tokens


def test_smart_resize_rounds_half_to_even_and_takes_limits():
    assert smart_resize(80, 3200) == (64, 3200)  # 80/32 = 2.5 -> 2
    assert smart_resize(112, 3200) == (128, 3200)  # 3.5 -> 4
    assert smart_resize(100, 100, min_pixels=32 * 32) == (96, 96)
    assert smart_resize(4096, 4096, max_pixels=1024 * 1024) == (1024, 1024)
    assert smart_resize(10, 2000) == (32, 3648)  # exactly 200:1 is allowed; 0 x 1984 -> scaled up


def test_smart_resize_equals_upstream_on_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as upstream

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 9000, (3000, 2)) if max(h, w) / min(h, w) <= 200]
    sizes += [(h, w) for h in range(8, 300, 7) for w in range(8, 300, 11) if max(h, w) / min(h, w) <= 200]
    for height, width in sizes:
        assert smart_resize(height, width) == upstream(height, width, 32, 65536, 16777216), (height, width)


@pytest.mark.parametrize("height, width, message", [
    (32, 6401, "aspect ratio"), (6401, 32, "aspect ratio"), (0, 100, "positive"), (100, -1, "positive")])
def test_smart_resize_errors(height, width, message):
    with pytest.raises(ValueError, match=message):
        smart_resize(height, width)


def rows_to_pixels(rows: np.ndarray, height: int, width: int) -> np.ndarray:
    """Invert the processor's layout and normalisation (mean = std = 0.5)."""
    grid = rows.reshape(height // 32, width // 32, 2, 2, 3, 2, 16, 16)
    np.testing.assert_array_equal(grid[:, :, :, :, :, 0], grid[:, :, :, :, :, 1])  # temporal copy
    image = grid[:, :, :, :, :, 0].transpose(0, 2, 5, 1, 3, 6, 4).reshape(height, width, 3)
    return np.round((image * 0.5 + 0.5) * 255).astype(np.uint8)


def screenshot_like(width: int, height: int, seed: int) -> np.ndarray:
    """Screenshot-like: flat regions, sharp edges and some noise."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, height), rng.integers(0, width)
        tall, wide = rng.integers(1, height // 3 + 2), rng.integers(1, width // 3 + 2)
        image[y:y + tall, x:x + wide] = rng.integers(0, 256, 3)
    noisy = rng.random((height, width)) < 0.1
    image[noisy] = rng.integers(0, 256, (int(noisy.sum()), 3))
    return image


@pytest.mark.parametrize("width, height", [(1920, 1080), (1170, 2532), (200, 100), (48, 48), (768, 512)])
def test_matches_the_processor(width, height):
    image = screenshot_like(width, height, seed=width)
    out = qwen3vl_processor()(images=Image.fromarray(image), return_tensors="np")
    new_h, new_w = smart_resize(height, width)
    pixels = resize_to(Image.fromarray(image), new_h, new_w)
    assert pixels.dtype == np.uint8 and pixels.shape == (new_h, new_w, 3)
    np.testing.assert_array_equal(pixels, rows_to_pixels(out["pixel_values"], new_h, new_w))
    np.testing.assert_array_equal(resize_to(image, new_h, new_w), pixels)  # array input, same result
    assert tuple(out["image_grid_thw"][0]) == image_grid_thw(new_h, new_w)
    full = kept_pixel_values(pixels)
    assert full.dtype == np.float32
    np.testing.assert_array_equal(full, out["pixel_values"])
    keep = np.random.default_rng(height).random((new_h // 32, new_w // 32)) < 0.4
    rows = kept_patch_rows(keep)
    assert rows.dtype == np.int64 and rows.size == 4 * keep.sum()
    np.testing.assert_array_equal(kept_pixel_values(pixels, keep), out["pixel_values"][rows])


ONE_SIDE = [(1080, 1920, 1088, 1920), (2160, 3840, 2176, 3840), (1800, 2880, 1792, 2880), (3000, 64, 1000, 64),
            (123, 96, 777, 96), (5000, 32, 4096, 32), (33, 64, 32, 64), (1, 32, 300, 32), (50, 1170, 50, 1184),
            (40, 1000, 40, 333), (40, 333, 40, 1000), (64, 7, 64, 256)]


@pytest.mark.parametrize("height, width, new_h, new_w", ONE_SIDE)
def test_compiled_one_side_resize_equals_pillow(monkeypatch, height, width, new_h, new_w):
    if geometry._kernels() is None:
        pytest.skip("numba is not installed: resize_to always uses Pillow")
    image = screenshot_like(width, height, seed=new_h + new_w)
    expected = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(geometry._resize_one_side(image, new_h, new_w), expected)
    np.testing.assert_array_equal(resize_to(image, new_h, new_w), expected)
    monkeypatch.setattr(geometry, "_kernels", lambda: None)  # the Pillow fallback
    np.testing.assert_array_equal(resize_to(image, new_h, new_w), expected)


def test_no_resize_returns_the_input():
    image = screenshot_like(64, 96, seed=1)
    assert resize_to(image, 96, 64) is image


def test_other_mean_std_and_table_path(monkeypatch):
    image = screenshot_like(256, 320, seed=2)
    expected = qwen3vl_processor(CLIP_MEAN, CLIP_STD)(images=Image.fromarray(image), return_tensors="np")
    keep = np.random.default_rng(0).random((10, 8)) < 0.5
    want = expected["pixel_values"][kept_patch_rows(keep)]
    np.testing.assert_array_equal(kept_pixel_values(image, keep, CLIP_MEAN, CLIP_STD), want)
    table, _ = geometry._lookup_table(CLIP_MEAN, CLIP_STD)
    monkeypatch.setattr(geometry, "_lookup_table", lambda mean, std: (table, False))
    np.testing.assert_array_equal(kept_pixel_values(image, keep, CLIP_MEAN, CLIP_STD), want)


def test_rgba_and_grey_pil_images_like_the_processor():
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (100, 150, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (300, 260), dtype=np.uint8), "L")
    for image in (rgba, grey):
        out = qwen3vl_processor()(images=image, return_tensors="np")
        new_h, new_w = smart_resize(image.height, image.width)
        np.testing.assert_array_equal(kept_pixel_values(resize_to(image, new_h, new_w)), out["pixel_values"])


def test_block_view_is_a_zero_copy_view():
    pixels = screenshot_like(96, 64, seed=4)
    blocks = block_view(pixels)
    assert blocks.shape == (2, 3, 32, 32, 3) and np.shares_memory(blocks, pixels)
    np.testing.assert_array_equal(blocks[1, 2], pixels[32:64, 64:96])
    with pytest.raises(ValueError, match="multiples of 32"):
        block_view(np.zeros((64, 80, 3), np.uint8))


def test_grid_rows_and_coordinates():
    assert image_grid_thw(1088, 1920) == (1, 68, 120)
    with pytest.raises(ValueError):
        image_grid_thw(1080, 1920)
    np.testing.assert_array_equal(kept_patch_rows(np.array([[True, False], [False, True]])),
                                  [0, 1, 2, 3, 12, 13, 14, 15])
    assert kept_patch_rows(np.zeros((2, 2), bool)).size == 0
    assert kept_pixel_values(np.zeros((64, 64, 3), np.uint8), np.zeros((2, 2), bool)).shape == (0, 1536)
    assert to_original(960, 544, (1920, 1080), (1920, 1088)) == (960.0, 540.0)
    assert to_resized(960, 540, (1920, 1080), (1920, 1088)) == (960.0, 544.0)
    assert to_original(*to_resized(123.5, 77.25, (1170, 2532), (1184, 2528)),
                       (1170, 2532), (1184, 2528)) == pytest.approx((123.5, 77.25))
    with pytest.raises(ValueError):
        to_original(1, 1, (0, 10), (32, 32))


@pytest.mark.parametrize("call, message", [
    (lambda: kept_pixel_values(np.zeros((64, 64, 3), np.uint8), np.ones((2, 3), bool)), "keep must be"),
    (lambda: kept_pixel_values(np.zeros((64, 64, 3), np.uint8), np.ones((2, 2), np.uint8)), "keep must be"),
    (lambda: kept_pixel_values(np.zeros((64, 64, 3), np.float32)), "uint8"),
    (lambda: kept_pixel_values(np.zeros((64, 64, 3), np.uint8), None, (0.5,), (0.5,)), "3 values"),
    (lambda: resize_to(np.zeros((10, 10), np.uint8), 32, 32), "shape"),
    (lambda: resize_to(np.zeros((10, 10, 3), np.uint8), 0, 32), "positive"),
    (lambda: kept_patch_rows(np.ones(4, bool)), "2-D bool"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_core_does_not_import_transformers_or_torch():
    code = ("import sys, pixelprune.geometry, pixelprune.selectors, pixelprune.decoder, pixelprune.hashing; "
            "bad = [m for m in ('transformers', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
