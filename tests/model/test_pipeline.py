"""The image-level pipeline against the stock processor's full-image path (tiny checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelprune.geometry import kept_patch_rows, kept_pixel_values, resize_to, smart_resize
from pixelprune.model.pipeline import PruneSettings, build_inputs, prepare_image, user_message, vision_spec
from pixelprune.model.processor import load_processor
from pixelprune.selectors import select_blocks

TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return load_processor(tiny_checkpoint)


@pytest.fixture(scope="module")
def screenshot(corpus_dir) -> Image.Image:
    """A 333x250 crop of a real desktop screenshot: not a multiple of 32, so smart_resize resizes."""
    with Image.open(corpus_dir / "desktop_pcmanfm_xterm_mousepad_1920x1080.png") as img:
        return img.convert("RGB").crop((0, 0, 333, 250))


@pytest.fixture(scope="module")
def web_page(corpus_dir) -> np.ndarray:
    """A 320x256 crop (no resize needed) of a web page, as a uint8 array."""
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        return np.asarray(img.convert("RGB"))[:256, :320].copy()


def stock(processor, images, messages):
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(images=images, text=[text], return_tensors="pt")


def test_keep_all_equals_the_processor_exactly(processor, screenshot):
    messages = user_message("Click the Home icon.")
    ours = build_inputs(processor, [screenshot], messages, PruneSettings(enabled=False))
    ref = stock(processor, [screenshot], messages)
    for key in TEXT_KEYS:
        assert torch.equal(ours.inputs[key], ref[key]), key
    assert ours.inputs["pixel_values"].dtype == torch.float32
    assert torch.equal(ours.inputs["pixel_values"], ref["pixel_values"])
    (report,) = ours.images
    assert report.original_size == (333, 250)
    assert report.resized_size == (320, 256)  # smart_resize: round(333/32)=10, round(250/32)=8 blocks
    assert report.kept == report.total == 80
    assert int((ours.inputs["input_ids"] == processor.image_token_id).sum()) == 80
    assert ours.keep[0].shape == (8, 10) and ours.keep[0].all()


def test_pruned_rows_are_the_processors_rows_at_kept_blocks(processor, screenshot):
    messages = user_message("Click the Home icon.")
    ours = build_inputs(processor, [screenshot], messages, PruneSettings())
    ref = stock(processor, [screenshot], messages)
    resized = resize_to(np.asarray(screenshot), 256, 320)
    keep = select_blocks(resized, method="pred2d", metric="max", tau=0.0)
    assert np.array_equal(ours.keep[0], keep)
    assert 0 < ours.images[0].kept == int(keep.sum()) < ours.images[0].total  # a real screen has redundancy
    assert torch.equal(ours.inputs["pixel_values"], ref["pixel_values"][torch.from_numpy(kept_patch_rows(keep))])
    for key in TEXT_KEYS:  # the text side is the FULL sequence, as the adapter needs it
        assert torch.equal(ours.inputs[key], ref[key]), key
    t = ours.timings
    assert t.resize > 0 and t.tokenize > 0 and min(t.select, t.patchify) >= 0 and t.upload == t.vit == 0


def test_two_images_in_one_prompt(processor, screenshot, web_page):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Before"},
                                             {"type": "image"}, {"type": "text", "text": "After: what changed?"}]}]
    ref = stock(processor, [screenshot, web_page], messages)
    ours = build_inputs(processor, [screenshot, web_page], messages, PruneSettings(enabled=False))
    for key in TEXT_KEYS:
        assert torch.equal(ours.inputs[key], ref[key]), key
    assert torch.equal(ours.inputs["pixel_values"], ref["pixel_values"])
    pruned = build_inputs(processor, [screenshot, web_page], messages, PruneSettings(method="raster"))
    rows = np.concatenate([kept_patch_rows(pruned.keep[0]),
                           kept_patch_rows(pruned.keep[1]) + 4 * pruned.images[0].total])
    assert torch.equal(pruned.inputs["pixel_values"], ref["pixel_values"][torch.from_numpy(rows)])
    assert [r.resized_size for r in pruned.images] == [(320, 256), (320, 256)]


def test_rgba_image_is_composited_like_the_processor(processor):
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, size=(70, 90, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    messages = user_message("x")
    ours = build_inputs(processor, [image], messages, PruneSettings(enabled=False))
    assert torch.equal(ours.inputs["pixel_values"], stock(processor, [image], messages)["pixel_values"])


def test_resize_limits_come_from_the_processor_config(tiny_checkpoint, web_page):
    small = load_processor(tiny_checkpoint)
    small.image_processor.size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    spec = vision_spec(small)
    assert (spec.min_pixels, spec.max_pixels) == (64 * 64, 128 * 128)
    assert spec.image_mean == spec.image_std == (0.5, 0.5, 0.5)
    messages = user_message("x")
    ours = build_inputs(small, [web_page], messages, PruneSettings(enabled=False))
    ref = stock(small, [web_page], messages)
    h, w = smart_resize(256, 320, min_pixels=64 * 64, max_pixels=128 * 128)
    assert ours.images[0].resized_size == (w, h) == (128, 96)
    for key in TEXT_KEYS:
        assert torch.equal(ours.inputs[key], ref[key]), key
    assert torch.equal(ours.inputs["pixel_values"], ref["pixel_values"])


def test_device_and_dtype(processor, web_page):
    ours = build_inputs(processor, [web_page], user_message("x"), PruneSettings(), dtype=torch.bfloat16)
    assert ours.inputs["pixel_values"].dtype == torch.bfloat16
    assert ours.inputs["input_ids"].dtype == torch.int64
    assert ours.inputs["image_grid_thw"].tolist() == [[1, 16, 20]]


def test_bad_input_gives_value_errors(processor, web_page):
    with pytest.raises(ValueError, match="image placeholders"):
        build_inputs(processor, [web_page, web_page], user_message("x"))
    with pytest.raises(ValueError, match="at least one image"):
        build_inputs(processor, [], user_message("x"))
    with pytest.raises(ValueError, match="uint8"):
        build_inputs(processor, [web_page.astype(np.float32)], user_message("x"))
    with pytest.raises(ValueError, match="PIL image"):
        build_inputs(processor, ["not an image"], user_message("x"))
    with pytest.raises(ValueError, match="aspect"):
        build_inputs(processor, [np.zeros((2, 500, 3), np.uint8)], user_message("x"))


def test_inputs_feed_the_adapter_like_the_processors_full_rows(processor, tiny_checkpoint, screenshot):
    """The pipeline's kept rows give the adapter the same logits as the processor's full rows
    with the same keep mask (the adapter gathers the kept rows itself in that case)."""
    from transformers import AutoModelForImageTextToText

    from pixelprune.model.adapter import PrunedQwen3VL

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    adapter = PrunedQwen3VL(model)
    messages = user_message("Click the Home icon.")
    ours = build_inputs(processor, [screenshot], messages, PruneSettings())
    ref = stock(processor, [screenshot], messages)
    with torch.inference_mode():
        a = adapter(**ours.inputs, keep=list(ours.keep)).logits
        b = adapter(**ref, keep=list(ours.keep)).logits
    kept_len = ref["input_ids"].shape[1] - (ours.images[0].total - ours.images[0].kept)
    assert a.shape == (1, kept_len, model.config.text_config.vocab_size)
    assert torch.equal(a, b)


def test_rows_stay_uint8_until_first_use(processor, web_page):
    """On the CPU path prepare_image stops at the keep mask: the float rows are built when the
    model first reads them (on the service's model worker), once, and never for a request whose
    vision features are cached."""
    spec = vision_spec(processor)
    prepared = prepare_image(web_page, PruneSettings(), spec)
    assert "pixel_values" not in vars(prepared) and prepared.timings.patchify == 0.0
    assert prepared.prepare_s == pytest.approx(prepared.timings.resize + prepared.timings.select)
    rows = prepared.pixel_values
    assert prepared.timings.patchify > 0 and prepared.pixel_values is rows  # built once
    expected = kept_pixel_values(prepared.pixels, prepared.keep, mean=spec.image_mean, std=spec.image_std)
    assert rows.dtype == torch.float32 and rows.shape == (4 * prepared.kept_blocks, 1536)
    np.testing.assert_array_equal(rows.numpy(), expected)

