"""Preprocessing on the device (resize_torch, kept_pixel_values_torch, prepare_image's device path)
against Pillow and the numpy/numba CPU path, bit for bit, on CPU tensors (the same torch code runs
on CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pixelprune.geometry import kept_pixel_values, resize_to, smart_resize
from pixelprune.model import device_prep
from pixelprune.model.device_prep import kept_pixel_values_torch, prepare_on_device, resize_torch
from pixelprune.model.pipeline import VisionSpec, prepare_image
from pixelprune.selectors import select_blocks
from pixelprune.settings import PruneSettings
from pixelprune_testlib import planted_image

SPEC = VisionSpec(min_pixels=65536, max_pixels=16777216, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

# (H, W) -> (new H, new W): up- and down-scaling, odd sizes, one side or both, extreme aspect
# ratios, and both pass orders of Pillow >= 13 (the height losing more / less than twice the width).
SIZES = [(250, 333, 256, 320), (100, 60, 64, 96), (60, 100, 96, 64), (100, 100, 64, 64), (100, 100, 64, 96),
         (500, 300, 100, 200), (300, 500, 200, 100), (37, 500, 64, 512), (17, 19, 256, 288), (1, 1, 64, 64),
         (2, 400, 32, 6400), (400, 2, 6400, 32), (3000, 40, 1000, 32), (40, 3000, 32, 1000), (97, 13, 31, 5),
         (1080, 1920, 1088, 1920), (2532, 1170, 2528, 1184), (333, 40, 333, 1000), (64, 7, 64, 256)]


def pillow(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def noise(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def corpus_images(corpus_dir, corpus_manifest) -> dict[str, np.ndarray]:
    return {e["file"]: np.asarray(Image.open(corpus_dir / e["file"]).convert("RGB")) for e in corpus_manifest}


@pytest.mark.parametrize("height, width, new_h, new_w", SIZES)
def test_resize_equals_pillow_and_resize_to(height, width, new_h, new_w):
    image = noise(height * 7 + width, height, width)
    expected = pillow(image, new_h, new_w)
    got = resize_torch(torch.from_numpy(image), new_h, new_w)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (new_h, new_w, 3)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(resize_to(image, new_h, new_w), expected)


def test_pass_order_follows_pillow():
    """The order of the two passes changes the result; Pillow 13 goes vertical first when the
    height loses more than twice as many pixels as the width, older Pillow never does."""
    assert device_prep._vertical_first(100, 60, 64, 96, pillow_major=13)
    assert device_prep._vertical_first(500, 300, 100, 200, pillow_major=13)
    assert not device_prep._vertical_first(300, 500, 200, 100, pillow_major=13)
    assert not device_prep._vertical_first(100, 100, 64, 64, pillow_major=13)  # 36 > 2 * 36 is false
    assert not device_prep._vertical_first(60, 60, 96, 96, pillow_major=13)  # growing height
    assert not device_prep._vertical_first(100, 60, 64, 96, pillow_major=12)
    image = torch.from_numpy(noise(5, 100, 60))
    horizontal_first = device_prep._resample_axis(device_prep._resample_axis(image, 1, 96), 0, 64)
    vertical_first = device_prep._resample_axis(device_prep._resample_axis(image, 0, 64), 1, 96)
    assert not torch.equal(horizontal_first, vertical_first)
    chosen = vertical_first if device_prep._vertical_first(100, 60, 64, 96) else horizontal_first
    np.testing.assert_array_equal(chosen.numpy(), pillow(image.numpy(), 64, 96))


def test_resize_returns_the_input_when_nothing_changes():
    image = torch.from_numpy(noise(1, 64, 96))
    assert resize_torch(image, 64, 96) is image


def test_corpus_screenshots_resize_like_resize_to(corpus_images):
    for name, image in corpus_images.items():
        new_h, new_w = smart_resize(*image.shape[:2])
        got = resize_torch(torch.from_numpy(image.copy()), new_h, new_w).numpy()
        np.testing.assert_array_equal(got, resize_to(image, new_h, new_w), err_msg=name)
        crop = image[:300, :420]  # both sides change, in both pass orders
        for size in ((96, 160), (256, 224)):
            np.testing.assert_array_equal(resize_torch(torch.from_numpy(crop.copy()), *size).numpy(),
                                          pillow(np.ascontiguousarray(crop), *size), err_msg=f"{name} {size}")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), height=st.integers(1, 70), width=st.integers(1, 70),
       new_h=st.integers(1, 90), new_w=st.integers(1, 90))
def test_random_resizes_equal_pillow(seed, height, width, new_h, new_w):
    image = noise(seed, height, width)
    np.testing.assert_array_equal(resize_torch(torch.from_numpy(image), new_h, new_w).numpy(),
                                  pillow(image, new_h, new_w))


def test_kept_rows_equal_the_cpu_rows_on_a_screenshot(corpus_images):
    image = corpus_images["desktop_pcmanfm_xterm_mousepad_1920x1080.png"][:512, :768].copy()
    tensor = torch.from_numpy(image)
    random_keep = np.random.default_rng(0).random((16, 24)) < 0.3
    for keep in (select_blocks(image), select_blocks(image, "raster", "mae", 0.05), random_keep, None):
        mask = None if keep is None else torch.from_numpy(keep)
        expected = kept_pixel_values(image, keep)
        got = kept_pixel_values_torch(tensor, mask)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got.numpy(), expected)
        bf16 = kept_pixel_values_torch(tensor, mask, dtype=torch.bfloat16)
        assert torch.equal(bf16, torch.from_numpy(expected).to(torch.bfloat16))


def test_kept_rows_of_a_strided_view_and_of_an_empty_mask(corpus_images):
    image = corpus_images["web_sphinx_quickstart_2560x1440.png"][:256, :448]
    view = torch.from_numpy(corpus_images["web_sphinx_quickstart_2560x1440.png"].copy())[:256, :448]
    assert not view.is_contiguous()
    keep = select_blocks(np.ascontiguousarray(image))
    np.testing.assert_array_equal(kept_pixel_values_torch(view, torch.from_numpy(keep)).numpy(),
                                  kept_pixel_values(np.ascontiguousarray(image), keep))
    none = kept_pixel_values_torch(view, torch.zeros((8, 14), dtype=torch.bool))
    assert none.shape == (0, 1536) and none.dtype == torch.float32


def test_kept_rows_with_another_mean_and_std():
    image = planted_image(3, 3, 4)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
    keep = select_blocks(image)
    got = kept_pixel_values_torch(torch.from_numpy(image), torch.from_numpy(keep), mean=mean, std=std)
    np.testing.assert_array_equal(got.numpy(), kept_pixel_values(image, keep, mean=mean, std=std))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), cols=st.integers(1, 5),
       share=st.floats(0.0, 1.0))
def test_random_kept_rows_equal_the_cpu_rows(seed, rows, cols, share):
    image = planted_image(seed, rows, cols)
    keep = np.random.default_rng(seed).random((rows, cols)) < share
    got = kept_pixel_values_torch(torch.from_numpy(image), torch.from_numpy(keep))
    np.testing.assert_array_equal(got.numpy(), kept_pixel_values(image, keep))


CONFIGS = [PruneSettings(), PruneSettings(method="raster"), PruneSettings(method="serpentine"),
           PruneSettings(tau=0.02), PruneSettings(method="raster", metric="mae", tau=0.05),
           PruneSettings(tau=0.001), PruneSettings.OFF]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepare_image_device_path_equals_the_cpu_path(corpus_images, dtype):
    shots = [corpus_images["web_python_tutorial_classes_1920x1080.png"][:300, :500],  # resized both ways
             corpus_images["mobile_flask_quickstart_1170x2532.png"][:700, :333],
             Image.fromarray(corpus_images["desktop_pcmanfm_xterm_mousepad_1920x1080.png"][:256, :320])]
    for shot in shots:
        for config in CONFIGS:
            cpu = prepare_image(shot, config, SPEC, dtype=dtype, on_device=False)
            dev = prepare_image(shot, config, SPEC, dtype=dtype, on_device=True)
            assert np.array_equal(dev.keep, cpu.keep), config
            assert dev.pixel_values.dtype == dtype and torch.equal(dev.pixel_values, cpu.pixel_values), config
            assert (dev.kept_blocks, dev.total_blocks) == (cpu.kept_blocks, cpu.total_blocks)
            assert (dev.original_size, dev.resized_size, dev.image_grid_thw) == \
                (cpu.original_size, cpu.resized_size, cpu.image_grid_thw)
            assert isinstance(dev.pixels, np.ndarray) and np.array_equal(dev.pixels, cpu.pixels)
            assert cpu.timings.upload == 0 and cpu.timings.resize > 0
            assert dev.timings.upload > 0 and min(dev.timings.resize, dev.timings.select, dev.timings.patchify) >= 0


def test_device_path_keeps_what_it_saw_where_it_is():
    image = planted_image(11, 8, 9)
    exact = prepare_on_device(image, (256, 288), PruneSettings())
    assert isinstance(exact.resized, torch.Tensor)  # tau = 0: selected on the device, nothing downloaded
    near = prepare_on_device(image, (256, 288), PruneSettings(tau=0.02))
    assert isinstance(near.resized, np.ndarray)  # tau > 0: downloaded for the numba scan
    assert np.array_equal(near.keep, select_blocks(image, tau=0.02))
    assert near.keep.sum() < exact.keep.sum() < near.keep.size


def test_cpu_device_is_the_cpu_path_unless_asked():
    image = planted_image(2, 8, 8)
    assert isinstance(prepare_image(image, PruneSettings(), SPEC).resized, np.ndarray)
    assert isinstance(prepare_image(image, PruneSettings(), SPEC, on_device=True).resized, torch.Tensor)


@pytest.mark.parametrize("call, message", [
    (lambda: resize_torch(np.zeros((4, 4, 3), np.uint8), 8, 8), "torch uint8"),
    (lambda: resize_torch(torch.zeros((4, 4, 3)), 8, 8), "dtype"),
    (lambda: resize_torch(torch.zeros((4, 4), dtype=torch.uint8), 8, 8), "shape"),
    (lambda: resize_torch(torch.zeros((0, 4, 3), dtype=torch.uint8), 8, 8), "shape"),
    (lambda: resize_torch(torch.zeros((4, 4, 3), dtype=torch.uint8), 0, 8), "positive"),
    (lambda: kept_pixel_values_torch(torch.zeros((40, 64, 3), dtype=torch.uint8)), "multiples of 32"),
    (lambda: kept_pixel_values_torch(torch.zeros((32, 64, 3), dtype=torch.uint8), torch.ones(1, 2)), "torch.bool"),
    (lambda: kept_pixel_values_torch(torch.zeros((32, 64, 3), dtype=torch.uint8),
                                     torch.ones(2, 1, dtype=torch.bool)), r"shape \(1, 2\), got torch.bool \(2, 1\)"),
    (lambda: kept_pixel_values_torch(torch.zeros((32, 64, 3), dtype=torch.uint8), np.ones((1, 2), bool)), "ndarray"),
    (lambda: kept_pixel_values_torch(torch.zeros((32, 32, 3), dtype=torch.uint8), mean=(0.5,)), "3 values"),
])
def test_bad_input_gives_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
