"""PrunedQwen3VL on the tiny random Qwen3-VL: stock equality, positions, cache, batching.

Inputs come from the checkpoint's own processor on crops of corpus screenshots and a
drawn GUI image; fast paths are checked against slow references written here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from pixelprune.model.pipeline import PruneSettings
from pixelprune.model.adapter import PrunedQwen3VL, VisionFeatures
from pixelprune.model.processor import rows_to_uint8_images
from pixelprune.selectors import select_blocks

PROMPT = "Click the Save button."


def crop(corpus_dir, name, box) -> Image.Image:
    with Image.open(corpus_dir / name) as img:
        return img.convert("RGB").crop(box)


@pytest.fixture(scope="module")
def web(corpus_dir) -> Image.Image:  # 512x384: a multiple of 32, so the processor does not resize
    return crop(corpus_dir, "web_python_tutorial_classes_1920x1080.png", (0, 0, 512, 384))


@pytest.fixture(scope="module")
def desktop(corpus_dir) -> Image.Image:  # 384x256
    return crop(corpus_dir, "desktop_pcmanfm_xterm_mousepad_1920x1080.png", (0, 0, 384, 256))


@pytest.fixture(scope="module")
def gui() -> Image.Image:
    """A drawn 448x320 dialog: flat background, title bar, text field, two buttons."""
    img = Image.new("RGB", (448, 320), (236, 236, 236))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, 447, 31), fill=(52, 101, 164))
    d.text((10, 10), "Save As", fill=(255, 255, 255))
    d.rectangle((40, 100, 400, 130), fill=(255, 255, 255), outline=(120, 120, 120))
    d.text((48, 110), "report-final.pdf", fill=(0, 0, 0))
    for x, label in ((220, "Cancel"), (320, "Save")):
        d.rectangle((x, 250, x + 90, 282), fill=(250, 250, 250), outline=(90, 90, 90))
        d.text((x + 25, 260), label, fill=(0, 0, 0))
    return img


def inputs_for(processor, images_per_sample, padding_side="left"):
    texts, images = [], []
    for sample in images_per_sample:
        content = [{"type": "image"} for _ in sample] + [{"type": "text", "text": PROMPT * (1 + len(texts))}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   tokenize=False, add_generation_prompt=True))
        images.extend(sample)
    processor.tokenizer.padding_side = padding_side
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def blocks_of(inputs, i=0):
    _, h, w = inputs["image_grid_thw"][i].tolist()
    return h // 2, w // 2


def random_keep(shape, seed, share=0.5):
    keep = np.random.default_rng(seed).random(shape) < share
    keep[0, 0] = True
    return keep


# ---------------------------------------------------------------- slow references
def slow_mrope(input_ids, image_token_id, grids, mask=None):
    """(3, L) MRoPE ids of one sample by the Qwen3-VL rule, token by token (pads get 0)."""
    ids = input_ids.tolist()
    mask = [1] * len(ids) if mask is None else mask.tolist()
    out = [[0, 0, 0] for _ in ids]
    pos, grid_iter, i = 0, iter(grids), 0
    while i < len(ids):
        if not mask[i]:
            i += 1
            continue
        if ids[i] != image_token_id:
            out[i] = [pos, pos, pos]
            pos, i = pos + 1, i + 1
            continue
        _, h, w = next(grid_iter)
        for r in range(h // 2):
            for c in range(w // 2):
                out[i] = [pos, pos + r, pos + c]
                i += 1
        pos += max(h, w) // 2
    return torch.tensor(out).T


def slow_kept_columns(input_ids, image_token_id, keeps, mask=None):
    """Column indices of the text tokens and kept image tokens, in order."""
    flat = iter(np.concatenate([k.reshape(-1) for k in keeps]).tolist())
    cols = []
    for i, tok in enumerate(input_ids.tolist()):
        if mask is not None and not mask[i]:
            continue
        if tok != image_token_id or next(flat):
            cols.append(i)
    return cols


# ---------------------------------------------------------------- keep all == stock
def test_keep_all_is_bit_identical_to_stock(model, processor, web):
    inp = inputs_for(processor, [[web]])
    adapter = PrunedQwen3VL(model, PruneSettings(enabled=False))
    all_kept = [np.ones(blocks_of(inp), dtype=bool)]
    with torch.no_grad():
        ref = model(**inp).logits
        disabled = adapter(**inp).logits
        explicit = adapter(**inp, keep=all_kept).logits
        # through the pruned machinery (precomputed ViT kwargs, mm_encoder_outputs, 4-row positions)
        vision = adapter.encode_images(inp["pixel_values"], inp["image_grid_thw"], all_kept)
        hooked = adapter(**inp, vision=vision).logits
    assert adapter.prepare(**inp, keep=all_kept).pruned is False
    assert adapter.prepare(**inp, vision=vision).pruned is True
    for out in (disabled, explicit, hooked):
        assert torch.equal(out, ref)
    gen_ref = model.generate(**inp, max_new_tokens=5, do_sample=False)
    for kwargs in ({}, {"vision": vision}):
        gen = adapter.generate(**inp, max_new_tokens=5, do_sample=False, **kwargs)
        assert torch.equal(gen[:, -5:], gen_ref[:, -5:])


# ---------------------------------------------------------------- positions
def test_kept_tokens_keep_their_full_sequence_mrope_ids(model, processor, web):
    inp = inputs_for(processor, [[web]])
    keep = [random_keep(blocks_of(inp), seed=1)]
    prepared = PrunedQwen3VL(model).prepare(**inp, keep=keep)
    pos = prepared.model_kwargs["position_ids"]
    full = slow_mrope(inp["input_ids"][0], model.config.image_token_id, inp["image_grid_thw"].tolist())
    cols = slow_kept_columns(inp["input_ids"][0], model.config.image_token_id, keep)
    assert pos.shape == (4, 1, len(cols))
    assert torch.equal(pos[1:, 0], full[:, cols])
    assert torch.equal(pos[0, 0], torch.arange(len(cols)))
    assert torch.equal(prepared.model_kwargs["input_ids"][0], inp["input_ids"][0, cols])
    # stock get_rope_index agrees with the slow rule on the full sequence
    stock, _ = model.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp["image_grid_thw"],
                                          attention_mask=inp["attention_mask"])
    assert torch.equal(stock[:, 0], full)
    assert prepared.rope_deltas.tolist() == [[int(full.max()) + 1 - len(cols)]]


def test_vit_gets_the_full_grid_rows_at_kept_patches(model, processor, web):
    inp = inputs_for(processor, [[web]])
    keep = [random_keep(blocks_of(inp), seed=2)]
    seen = {}
    handle = model.model.visual.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs, pixels=args[0]), with_kwargs=True)
    try:
        PrunedQwen3VL(model).encode_images(inp["pixel_values"], inp["image_grid_thw"], keep)
    finally:
        handle.remove()
    _, h, w = inp["image_grid_thw"][0].tolist()
    rows, positions = [], []
    for bi in range(h // 2):
        for bj in range(w // 2):
            for r in range(2):
                for c in range(2):
                    if keep[0][bi, bj]:
                        rows.append(((bi * (w // 2) + bj) * 4) + r * 2 + c)
                        positions.append((2 * bi + r, 2 * bj + c))
    visual = model.model.visual
    idx, wts = get_vision_interpolation_indices_and_weights(
        inp["image_grid_thw"], visual.num_grid_per_side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    assert seen["position_ids"].tolist() == [list(p) for p in positions]
    assert torch.equal(seen["interp_indices"], idx[rows])
    assert torch.equal(seen["interp_weights"], wts[rows])
    assert seen["cu_seqlens"].tolist() == [0, len(rows)]
    assert seen["cu_seqlens"].dtype == torch.int32
    assert torch.equal(seen["pixels"], inp["pixel_values"][rows])


def test_kept_rows_only_equal_full_rows(model, processor, gui):
    inp = inputs_for(processor, [[gui]])
    keep = [select_blocks(np.asarray(gui))]
    assert 0 < keep[0].sum() < keep[0].size
    rows = torch.from_numpy(np.flatnonzero(np.repeat(keep[0].reshape(-1), 4)))
    adapter = PrunedQwen3VL(model)
    with torch.no_grad():
        full = adapter(**inp, keep=keep).logits
        only_kept = adapter(**{**inp, "pixel_values": inp["pixel_values"][rows]}, keep=keep).logits
    assert full.shape[1] == inp["input_ids"].shape[1] - (keep[0].size - keep[0].sum())
    assert torch.equal(full, only_kept)


# ---------------------------------------------------------------- cached decoding
def test_generate_steps_equal_uncached_reruns_of_the_pruned_prefix(model, processor, web):
    inp = inputs_for(processor, [[web]])
    keep = [select_blocks(np.asarray(web))]
    adapter = PrunedQwen3VL(model)
    vision = adapter.encode_images(inp["pixel_values"], inp["image_grid_thw"], keep)
    out = adapter.generate(**inp, vision=vision, max_new_tokens=5, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    image_id = model.config.image_token_id
    cols = slow_kept_columns(inp["input_ids"][0], image_id, keep)
    prefix_ids = inp["input_ids"][0, cols]
    prefix_pos = slow_mrope(inp["input_ids"][0], image_id, inp["image_grid_thw"].tolist())[:, cols]
    new_tokens = out.sequences[0, len(cols):]
    assert len(out.logits) == len(new_tokens) == 5
    worst = 0.0
    for step in range(5):
        ids = torch.cat([prefix_ids, new_tokens[:step]])[None]
        mrope = torch.cat([prefix_pos, prefix_pos.max() + 1 + torch.arange(step).expand(3, -1)], dim=1)
        pos = torch.cat([torch.arange(ids.shape[1])[None], mrope])[:, None]
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos,
                        mm_token_type_ids=(ids == image_id).long(), use_cache=False,
                        mm_encoder_outputs={"image": vision.encoder_output()}).logits[0, -1]
        worst = max(worst, (out.logits[step][0] - ref).abs().max().item())
        assert int(ref.argmax()) == int(new_tokens[step])
    assert worst < 1e-5, worst


# ---------------------------------------------------------------- batches and several images
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(model, processor, web, desktop, side):
    batch = inputs_for(processor, [[web], [desktop]], padding_side=side)
    keeps = [select_blocks(np.asarray(web)), select_blocks(np.asarray(desktop))]
    adapter = PrunedQwen3VL(model)
    with torch.no_grad():
        out = adapter(**batch, keep=keeps).logits
    mask = adapter.prepare(**batch, keep=keeps).model_kwargs["attention_mask"].bool()
    assert not mask.all()  # the pruned samples have different lengths
    for i, (image, keep) in enumerate(zip((web, desktop), keeps)):
        alone = inputs_for(processor, [[image]])
        alone["input_ids"] = batch["input_ids"][i, batch["attention_mask"][i].bool()][None]  # same prompt text
        alone["attention_mask"] = torch.ones_like(alone["input_ids"])
        alone["mm_token_type_ids"] = batch["mm_token_type_ids"][i, batch["attention_mask"][i].bool()][None]
        with torch.no_grad():
            ref = adapter(**alone, keep=[keep]).logits[0]
        torch.testing.assert_close(out[i][mask[i]], ref, rtol=0, atol=1e-5)


def test_left_padded_batch_generates_like_each_sample_alone(model, processor, web, gui):
    batch = inputs_for(processor, [[web], [gui]], padding_side="left")
    keeps = [select_blocks(np.asarray(web)), select_blocks(np.asarray(gui))]
    adapter = PrunedQwen3VL(model)
    out = adapter.generate(**batch, keep=keeps, max_new_tokens=4, do_sample=False,
                           return_dict_in_generate=True, output_logits=True)
    for i, (image, keep) in enumerate(zip((web, gui), keeps)):
        valid = batch["attention_mask"][i].bool()
        alone = {"input_ids": batch["input_ids"][i, valid][None], "pixel_values": inputs_for(processor, [[image]])[
            "pixel_values"], "image_grid_thw": batch["image_grid_thw"][i:i + 1]}
        ref = adapter.generate(**alone, keep=[keep], max_new_tokens=4, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences[i, -4:], ref.sequences[0, -4:])
        for a, b in zip(out.logits, ref.logits):
            torch.testing.assert_close(a[i], b[0], rtol=0, atol=1e-5)


def test_text_only_and_mixed_batches(model, processor, gui):
    adapter = PrunedQwen3VL(model)
    text = processor.tokenizer(["<|im_start|>user\nHello there<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(adapter(**text).logits, model(**text).logits)
    batch = inputs_for(processor, [[gui], []])  # sample 1 has no image
    keep = [select_blocks(np.asarray(gui))]
    with torch.no_grad():
        out = adapter(**batch, keep=keep).logits
        mask = adapter.prepare(**batch, keep=keep).model_kwargs["attention_mask"].bool()
        alone_text = {k: batch[k][1:2, batch["attention_mask"][1].bool()] for k in ("input_ids", "attention_mask")}
        alone_image = {"input_ids": batch["input_ids"][:1], "pixel_values": batch["pixel_values"],
                       "image_grid_thw": batch["image_grid_thw"]}
        torch.testing.assert_close(out[1][mask[1]], model(**alone_text).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[0][mask[0]], adapter(**alone_image, keep=keep).logits[0], rtol=0, atol=1e-5)


def test_two_images_in_one_prompt(model, processor, web, gui):
    inp = inputs_for(processor, [[web, gui]])
    keeps = [select_blocks(np.asarray(web)), select_blocks(np.asarray(gui))]
    adapter = PrunedQwen3VL(model)
    with torch.no_grad():
        assert torch.equal(adapter(**inp, keep=[np.ones(k.shape, bool) for k in keeps]).logits, model(**inp).logits)
        vision = adapter.encode_images(inp["pixel_values"], inp["image_grid_thw"], keeps)
        out = adapter(**inp, vision=vision).logits
        # each image encoded alone: the ViT attends within one image only
        n0 = int(inp["image_grid_thw"][0].prod())
        parts = [adapter.encode_images(inp["pixel_values"][:n0], inp["image_grid_thw"][:1], keeps[:1]),
                 adapter.encode_images(inp["pixel_values"][n0:], inp["image_grid_thw"][1:], keeps[1:])]
    assert vision.kept_blocks == tuple(int(k.sum()) for k in keeps)
    for i, part in enumerate(parts):
        torch.testing.assert_close(vision.embeds[i], part.embeds[0], rtol=0, atol=1e-5)
        for level, part_level in zip(vision.deepstack, part.deepstack):
            torch.testing.assert_close(level[i], part_level[0], rtol=0, atol=1e-5)
    image_id = model.config.image_token_id
    cols = slow_kept_columns(inp["input_ids"][0], image_id, keeps)
    full = slow_mrope(inp["input_ids"][0], image_id, inp["image_grid_thw"].tolist())
    pos = adapter.prepare(**inp, vision=vision).model_kwargs["position_ids"]
    assert torch.equal(pos[1:, 0], full[:, cols])
    assert out.shape[1] == len(cols)


# ---------------------------------------------------------------- dtypes, attention, side by side
def test_bfloat16_runs_and_keep_all_matches_stock(tiny_checkpoint, processor, web):
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).eval()
    inp = inputs_for(processor, [[web]])
    keep = [select_blocks(np.asarray(web))]
    adapter = PrunedQwen3VL(model)
    with torch.no_grad():
        all_kept = [np.ones(keep[0].shape, bool)]
        vision = adapter.encode_images(inp["pixel_values"], inp["image_grid_thw"], all_kept)
        assert torch.equal(adapter(**inp, vision=vision).logits, model(**inp).logits)
        out = adapter(**inp, keep=keep).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert vision.embeds[0].dtype == torch.bfloat16
    gen = adapter.generate(**inp, keep=keep, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == out.shape[1] + 3


def test_eager_attention_matches_sdpa(tiny_checkpoint, model, processor, desktop):
    eager = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    inp = inputs_for(processor, [[desktop]])
    keep = [random_keep(blocks_of(inp), seed=3)]
    with torch.no_grad():
        a = PrunedQwen3VL(eager)(**inp, keep=keep).logits
        b = PrunedQwen3VL(model)(**inp, keep=keep).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_two_wrapped_models_side_by_side(tiny_checkpoint, model, processor, gui):
    import transformers.models.qwen3_vl.modeling_qwen3_vl as qwen3_vl

    before = {name: dict(vars(cls)) for name, cls in vars(qwen3_vl).items() if isinstance(cls, type)}
    other = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    pruned = PrunedQwen3VL(model, PruneSettings(method="pred2d"))
    full = PrunedQwen3VL(other, PruneSettings(enabled=False))
    inp = inputs_for(processor, [[gui]])
    with torch.no_grad():
        first = pruned(**inp).logits
        unpruned = full(**inp).logits
        again = pruned(**inp).logits
        stock = other(**inp).logits
    kept = int(select_blocks(np.asarray(gui)).sum())
    assert first.shape[1] == inp["input_ids"].shape[1] - (blocks_of(inp)[0] * blocks_of(inp)[1] - kept)
    assert torch.equal(first, again)
    assert torch.equal(unpruned, stock)
    after = {name: dict(vars(cls)) for name, cls in vars(qwen3_vl).items() if isinstance(cls, type)}
    assert before == after


# ---------------------------------------------------------------- selection
def test_select_inverts_processor_rows_exactly(model, processor, web, gui):
    inp = inputs_for(processor, [[web, gui]])
    images = rows_to_uint8_images(inp["pixel_values"], inp["image_grid_thw"].tolist())
    assert np.array_equal(images[0], np.asarray(web)) and np.array_equal(images[1], np.asarray(gui))
    masks = PrunedQwen3VL(model, PruneSettings(method="pred2d", metric="max", tau=0.0)).select(
        inp["pixel_values"], inp["image_grid_thw"])
    assert [m.tolist() for m in masks] == [select_blocks(np.asarray(web)).tolist(),
                                           select_blocks(np.asarray(gui)).tolist()]
    raster = PrunedQwen3VL(model, PruneSettings(method="raster")).select(inp["pixel_values"], inp["image_grid_thw"])
    assert raster[1].tolist() == select_blocks(np.asarray(gui), method="raster").tolist()


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_error(model, processor, web):
    inp = inputs_for(processor, [[web]])
    adapter = PrunedQwen3VL(model)
    shape = blocks_of(inp)
    good = [np.ones(shape, bool)]
    cases = {
        "bool array of shape": dict(keep=[np.ones((shape[0], shape[1] + 1), bool)]),
        "one bool mask per image": dict(keep=good * 2),
        "keeps no block": dict(keep=[np.zeros(shape, bool)]),
        "bool array": dict(keep=[np.ones(shape, np.int64)]),
    }
    for message, kwargs in cases.items():
        with pytest.raises(ValueError, match=message):
            adapter(**inp, **kwargs)
    short = {**inp, "input_ids": inp["input_ids"][:, 1:], "attention_mask": inp["attention_mask"][:, 1:],
             "mm_token_type_ids": inp["mm_token_type_ids"][:, 1:]}
    image_at = int(inp["mm_token_type_ids"][0].nonzero()[0])
    drop = torch.ones(inp["input_ids"].shape[1], dtype=torch.bool)
    drop[image_at] = False
    missing = {k: v[:, drop] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
               for k, v in inp.items()}
    with pytest.raises(ValueError, match="do not match image_grid_thw"):
        adapter(**missing, keep=[random_keep(shape, 4)])
    with pytest.raises(ValueError, match="rows"):
        adapter(**{**short, "pixel_values": inp["pixel_values"][:-4]}, keep=[random_keep(shape, 4)])
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        adapter(**{**inp, "mm_token_type_ids": torch.zeros_like(inp["mm_token_type_ids"])}, keep=[random_keep(shape, 4)])
    vision = adapter.encode_images(inp["pixel_values"], inp["image_grid_thw"], [random_keep(shape, 5)])
    with pytest.raises(ValueError, match="keep masks differ"):
        adapter(**inp, vision=vision, keep=[random_keep(shape, 6)])
    with pytest.raises(ValueError, match="unsupported inputs for PrunedQwen3VL"):
        adapter(**inp, keep=good, pixel_values_videos=inp["pixel_values"])
    with pytest.raises(ValueError, match="Qwen3VLForConditionalGeneration"):
        PrunedQwen3VL(object())
    assert isinstance(vision, VisionFeatures) and vision.total_blocks == (shape[0] * shape[1],)
