"""The ViT's attention segments stay on the host for sdpa and eager (no device sync per layer) and go to the
device with a host-int max_seqlen only for flash attention; the features are unchanged (bit-equal on CPU).

The kwargs are read where the ViT receives them (a forward pre-hook on `model.model.visual`). A ViT on
torch's "meta" device (shapes only; reading a value back raises) stands in for a GPU: encode_images runs
there only if nothing in the ViT reads a device tensor back to the host, which on CUDA is a sync."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from pixelprune.model.adapter import PrunedQwen3VL
from pixelprune.model.positions import kept_patch_rows, vision_attention_kwargs
from pixelprune.model.processor import load_processor
from pixelprune.model.tiny import TINY_CONFIG

SCREENSHOT = "web_python_tutorial_classes_1920x1080.png"


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_checkpoint):
    return AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                       attn_implementation=request.param).eval()


@pytest.fixture(scope="module")
def images(tiny_checkpoint, corpus_dir) -> dict:
    """Processor rows and grids of two crops (512x384 and 256x448: wide and tall), with random keep masks."""
    processor = load_processor(tiny_checkpoint)
    with Image.open(corpus_dir / SCREENSHOT) as img:
        page = img.convert("RGB")
        crops = [page.crop((0, 0, 512, 384)), page.crop((600, 200, 856, 648))]
    out = processor.image_processor(images=crops, return_tensors="pt")
    grids = out["image_grid_thw"]
    rng = np.random.default_rng(4)
    keep = [rng.random((h // 2, w // 2)) < 0.4 for _, h, w in grids.tolist()]
    for mask in keep:
        mask[0, 0] = True
    return {"pixel_values": out["pixel_values"], "grid": grids, "keep": keep}


def seen_by_vit(model, call) -> dict:
    seen = {}
    handle = model.model.visual.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs),
                                                          with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen


def test_sdpa_and_eager_get_cu_seqlens_on_the_host_and_no_max_seqlen(model, images):
    adapter = PrunedQwen3VL(model)
    seen = seen_by_vit(model, lambda: adapter.encode_images(images["pixel_values"], images["grid"], images["keep"]))
    kept = [int(m.sum()) for m in images["keep"]]
    assert seen["cu_seqlens"].device.type == "cpu" and seen["cu_seqlens"].dtype == torch.int32
    assert seen["cu_seqlens"].tolist() == [0, 4 * kept[0], 4 * (kept[0] + kept[1])]
    assert seen.get("max_seqlen") is None


def test_features_are_unchanged(model, images):
    """Pruned: equal to the ViT called with cu_seqlens handed over as a tensor of the model's device (the
    previous call); nothing pruned: equal to the stock ViT computing every input itself."""
    adapter, visual = PrunedQwen3VL(model), model.model.visual
    pixels, grid, keep = images["pixel_values"], images["grid"], images["keep"]
    with torch.no_grad():
        got = adapter.encode_images(pixels, grid, keep)
        rows = kept_patch_rows(keep, grid.tolist())
        idx, wts = get_vision_interpolation_indices_and_weights(grid, visual.num_grid_per_side, mode="bilinear",
                                                                 align_corners=True, spatial_merge_size=2)
        kept = [int(m.sum()) for m in keep]
        cu = F.pad(torch.tensor([4 * k for k in kept]).cumsum(0, dtype=torch.int32), (1, 0)).to(visual.device)
        old = visual(pixels[rows], grid_thw=grid, return_dict=True, position_ids=get_vision_position_ids(grid, 2)[rows],
                     interp_indices=idx[rows], interp_weights=wts[rows], cu_seqlens=cu)
        all_kept = [np.ones_like(m) for m in keep]
        full = adapter.encode_images(pixels, grid, all_kept)
        stock = visual(pixels, grid_thw=grid, return_dict=True)
    assert torch.equal(torch.cat(got.embeds), old.pooler_output)
    for level, feature in zip(got.deepstack, old.deepstack_features):
        assert torch.equal(torch.cat(level), feature)
    assert torch.equal(torch.cat(full.embeds), stock.pooler_output)
    for level, feature in zip(full.deepstack, stock.deepstack_features):
        assert torch.equal(torch.cat(level), feature)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn3"])
def test_flash_attention_gets_device_cu_seqlens_and_a_host_max_seqlen(tiny_checkpoint, implementation):
    config = copy.deepcopy(AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).config.vision_config)
    config._attn_implementation = implementation
    got = vision_attention_kwargs([3, 7, 5], config, torch.device("meta"))  # meta: shows the move, runs anywhere
    assert got["cu_seqlens"].device.type == "meta" and got["cu_seqlens"].dtype == torch.int32
    assert got["cu_seqlens"].shape == (4,)
    assert type(got["max_seqlen"]) is int and got["max_seqlen"] == 28
    config._attn_implementation = "sdpa"
    host = vision_attention_kwargs([3, 7, 5], config, torch.device("meta"))
    assert list(host) == ["cu_seqlens"] and host["cu_seqlens"].tolist() == [0, 12, 40, 60]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_vit_never_reads_a_device_value_back(implementation):
    config = Qwen3VLConfig(**TINY_CONFIG)
    config.vision_config._attn_implementation = implementation
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config).eval()
    keep = [np.random.default_rng(1).random((8, 12)) < 0.5, np.ones((6, 4), dtype=bool)]
    keep[0][0, 0] = True
    grid = torch.tensor([[1, 16, 24], [1, 12, 8]])
    with torch.no_grad():
        out = PrunedQwen3VL(model).encode_images(torch.zeros(16 * 24 + 12 * 8, 1536), grid, keep)
    assert [e.shape[0] for e in out.embeds] == [int(keep[0].sum()), 24]
    assert out.embeds[0].device.type == "meta"
