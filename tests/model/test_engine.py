"""GroundingEngine on the tiny random-weight checkpoint: prepare, encode, ground, vision reuse."""

from __future__ import annotations

import dataclasses
import weakref

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pixelprune.model.engine import (
    PROMPT_CACHE_SIZE, GroundingEngine, GroundingOutput, ModelSpec, PruneSettings, checkpoint_has_random_weights,
    attention_config, resolve_attn_implementation, resolve_device, resolve_dtype,
)
from pixelprune.geometry import resize_to, smart_resize
from pixelprune.model.pipeline import tokenize, user_message
from pixelprune.points import grounding_prompt, parse_point, point_to_pixels
from pixelprune.selectors import select_blocks

STAGES = ("resize", "select", "patchify", "vit", "prefill", "decode_tokens", "ttft")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> GroundingEngine:
    return GroundingEngine.load(ModelSpec(model=str(tiny_checkpoint), max_new_tokens=6))


@pytest.fixture(scope="module")
def screenshot(corpus_dir) -> np.ndarray:
    """A 352x260 crop of a real web-page screenshot (resized by smart_resize to 352x256)."""
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        return np.asarray(img.convert("RGB"))[100:360, 200:552].copy()


def test_load_resolves_auto_settings_and_detects_random_weights(engine, tiny_checkpoint):
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.model.config._attn_implementation == "sdpa"
    assert not engine.model.training
    assert engine.is_random_weights is True
    assert engine.max_new_tokens == 6
    assert engine.model.config.pixelprune_random_weights is True  # the flag tiny.py writes
    no_flag = SimpleNamespace()
    assert checkpoint_has_random_weights(str(tiny_checkpoint), no_flag) is True  # README marker alone
    assert checkpoint_has_random_weights(str(tiny_checkpoint.parent), no_flag) is False


def test_resolvers():
    cpu = torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else cpu)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_attn_implementation(None, cpu) == "sdpa"
    assert resolve_attn_implementation("eager", cpu) == "eager"
    for bad in (lambda: resolve_device("tpu:7"), lambda: resolve_dtype("int8", cpu)):
        with pytest.raises(ValueError):
            bad()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_prepare_matches_select_blocks_on_the_resized_pixels(engine, screenshot):
    prepared = engine.prepare(screenshot, PruneSettings())
    h, w = smart_resize(260, 352)
    assert (prepared.original_size, prepared.resized_size) == ((352, 260), (w, h)) == ((352, 260), (352, 256))
    resized = resize_to(screenshot, h, w)
    assert np.array_equal(prepared.pixels, resized)
    assert np.array_equal(prepared.keep, select_blocks(resized, method="pred2d", metric="max", tau=0.0))
    assert prepared.kept_blocks == int(prepared.keep.sum()) < prepared.total_blocks == 88
    assert prepared.pixel_values.shape == (4 * prepared.kept_blocks, 1536)
    assert prepared.image_grid_thw == (1, 16, 22)
    assert prepared.timings.resize > 0 and prepared.timings.patchify > 0 and prepared.timings.upload == 0
    off = engine.prepare(screenshot, PruneSettings(enabled=False))
    assert off.kept_blocks == off.total_blocks == 88 and off.keep.all()
    with pytest.raises(ValueError):
        engine.prepare(screenshot, PruneSettings(method="nope"))


def test_ground_returns_consistent_values(engine, screenshot):
    prepared = engine.prepare(screenshot, PruneSettings())
    out = engine.ground(prepared, "Click the Classes heading")
    assert isinstance(out, GroundingOutput)
    t = out.timings
    assert all(getattr(t, stage) > 0 for stage in STAGES) and t.decode == t.queue == t.total == 0
    assert t.ttft >= t.vit + t.prefill and t.ttft >= t.resize + t.select + t.patchify
    # the engine's events: admitted -> ViT -> prefill -> first token, in order; their spans add up to the
    # engine's part of the TTFT (the rest is the caller's preparation)
    names = [name for name, _ in t.events]
    assert names == ["admitted", "vit_start", "vit_end", "prefill_start", "first_token"]
    assert all(span >= 0 for _, span in t.spans())
    assert sum(span for _, span in t.spans()) == pytest.approx(t.ttft - prepared.prepare_s, abs=1e-9)
    assert t.vit == pytest.approx(dict(t.spans())["vit_end"]) and t.prefill == pytest.approx(
        dict(t.spans())["first_token"])
    assert out.vision_reused is False and out.vision.kept_blocks == (prepared.kept_blocks,)
    assert (out.kept_blocks, out.total_blocks) == (prepared.kept_blocks, prepared.total_blocks)
    assert out.retain_ratio == pytest.approx(prepared.kept_blocks / 88)
    assert 1 <= out.generated_tokens <= 6
    # raw text decoded without special tokens; the point is whatever the parser finds, mapped to the original
    assert "<|im_end|>" not in out.raw_text
    found = parse_point(out.raw_text)
    if found is None:
        assert out.point is None and out.point_normalized is None
    else:
        assert out.point == point_to_pixels((found.x, found.y), (352, 260))
    # KV cache of the prompt: 4 layers x (K + V) x 2 kv heads x 32 dims x 4 bytes per token
    prompt_tokens = _prompt_tokens(engine, prepared, "Click the Classes heading")
    assert out.kv_cache_bytes == prompt_tokens * 4 * 2 * 2 * 32 * 4


def _prompt_tokens(engine, prepared, instruction) -> int:
    from pixelprune.model.pipeline import tokenize, user_message
    from pixelprune.points import grounding_prompt

    ids = tokenize(engine.processor, user_message(grounding_prompt(instruction)), [prepared.image_grid_thw])
    return int(ids["input_ids"].shape[1]) - (prepared.total_blocks - prepared.kept_blocks)


def test_vision_reuse_skips_the_vit_and_gives_the_same_answer(engine, screenshot, monkeypatch):
    prepared = engine.prepare(screenshot, PruneSettings())
    first = engine.ground(prepared, "Open the menu")
    calls = []
    monkeypatch.setattr(engine.adapter, "encode_images", lambda *a, **k: calls.append(a) or pytest.fail("ViT ran"))
    again = engine.ground(prepared, "Open the menu", vision=first.vision)
    assert calls == [] and again.vision_reused is True and again.timings.vit == 0.0
    assert again.raw_text == first.raw_text and again.vision is first.vision
    assert again.kv_cache_bytes == first.kv_cache_bytes


def test_keep_all_and_pruned_both_run(engine, screenshot):
    full = engine.ground(engine.prepare(screenshot, PruneSettings(enabled=False)), "Open the menu")
    pruned = engine.ground(engine.prepare(screenshot, PruneSettings(method="raster")), "Open the menu")
    assert full.kept_blocks == full.total_blocks == 88 and full.retain_ratio == 1.0
    assert pruned.kept_blocks < 88
    per_token = 4 * 2 * 2 * 32 * 4
    assert full.kv_cache_bytes - pruned.kv_cache_bytes == (88 - pruned.kept_blocks) * per_token


def test_custom_prompt_and_bad_requests(engine, screenshot):
    prepared = engine.prepare(screenshot, PruneSettings())
    out = engine.ground(prepared, "OK", prompt="Where is {instruction}? Answer (x, y).", max_new_tokens=2)
    assert out.generated_tokens <= 2
    with pytest.raises(ValueError, match="placeholder"):
        engine.ground(prepared, "OK", prompt="no placeholder")
    with pytest.raises(ValueError, match="non-empty"):
        engine.ground(prepared, "")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.ground(prepared, "OK", max_new_tokens=0)
    other = engine.prepare(screenshot[:200, :200].copy(), PruneSettings())
    with pytest.raises(ValueError):
        engine.ground(other, "OK", vision=engine.encode(prepared))


def test_encode_and_warmup(engine, screenshot):
    prepared = engine.prepare(screenshot, PruneSettings())
    features, seconds = engine.encode_timed(prepared)
    assert seconds >= 0 and features.kept_blocks == (prepared.kept_blocks,)
    assert features.embeds[0].shape == (prepared.kept_blocks, 128)
    out = engine.warmup()
    assert out.generated_tokens <= 2 and out.total_blocks == 64


def test_outputs_are_frozen(engine, screenshot):
    prepared = engine.prepare(screenshot, PruneSettings())
    with pytest.raises(dataclasses.FrozenInstanceError):
        prepared.kept_blocks = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelSpec().model = "x"


def test_keep_all_answers_like_the_stock_model(engine, screenshot):
    """Pruning off: the engine's answer equals processor + stock `model.generate` (greedy)."""
    from pixelprune.model.pipeline import user_message
    from pixelprune.points import grounding_prompt

    out = engine.ground(engine.prepare(screenshot, PruneSettings(enabled=False)), "Open the menu")
    processor = engine.processor
    text = processor.apply_chat_template(user_message(grounding_prompt("Open the menu")), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(images=[Image.fromarray(screenshot)], text=[text], return_tensors="pt")
    with torch.inference_mode():
        ids = engine.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1]:]
    assert out.generated_tokens == len(new)
    assert out.raw_text == processor.tokenizer.decode(new, skip_special_tokens=True)


def test_bfloat16_engine_runs(tiny_checkpoint, screenshot):
    engine = GroundingEngine.load(ModelSpec(model=str(tiny_checkpoint), dtype="bfloat16", max_new_tokens=2))
    assert engine.dtype == torch.bfloat16
    prepared = engine.prepare(screenshot, PruneSettings())
    assert prepared.pixel_values.dtype == torch.bfloat16
    out = engine.ground(prepared, "Open the menu")
    assert 1 <= out.generated_tokens <= 2
    prompt_tokens = _prompt_tokens(engine, prepared, "Open the menu")
    assert out.kv_cache_bytes == prompt_tokens * 4 * 2 * 2 * 32 * 2  # 2 bytes per bfloat16 value


def test_prompt_ids_are_cached_per_text_and_bounded(engine, screenshot):
    prepared = engine.prepare(screenshot, PruneSettings())
    text = grounding_prompt("the OK button")
    fresh = tokenize(engine.processor, user_message(text), [prepared.image_grid_thw])
    ids = engine.prompt_ids(text)
    assert engine.prompt_ids(text) is ids  # second lookup: no template, no tokenizer
    cached = tokenize(engine.processor, user_message(text), [prepared.image_grid_thw], ids=ids)
    assert fresh.keys() == cached.keys()
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    for i in range(PROMPT_CACHE_SIZE + 3):
        engine.prompt_ids(f"item {i}")
    assert len(engine._prompt_cache) == PROMPT_CACHE_SIZE
    assert text not in engine._prompt_cache and f"item {PROMPT_CACHE_SIZE + 2}" in engine._prompt_cache


def test_text_attention_must_take_4d_masks(engine):
    """The batched text model is given 4-D masks: sdpa or eager; the ViT may use flash-attn."""
    assert attention_config("sdpa") == "sdpa" and attention_config("eager") == "eager"
    assert attention_config("flash_attention_2") == {"text_config": "sdpa", "vision_config": "flash_attention_2"}
    text = engine.model.config.text_config
    saved = text._attn_implementation
    try:
        text._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="4-D masks"):
            GroundingEngine(engine.model, engine.processor)
    finally:
        text._attn_implementation = saved


def test_the_kv_pool_is_sized_from_the_free_device_memory(engine):
    """Without --max-batch-tokens a CUDA engine sizes its pool after the warm-up: the fraction of the free
    memory left after the prefix cache, in whole positions (the same code path runs here with the free
    bytes given); a CPU engine takes CPU_KV_TOKENS, and --max-batch-tokens always wins."""
    from pixelprune.model.engine import kv_pool_tokens
    from pixelprune.model.request import CPU_KV_TOKENS, BatchSettings

    per_token = engine.kv_bytes_per_token  # 4 layers x (K, V) x 2 heads x 32 x 4 bytes = 2048
    assert kv_pool_tokens(10 * 2 ** 30, 0.5, per_token, 2 ** 30) == int(9 * 2 ** 30 * 0.5) // per_token == 2359296
    assert kv_pool_tokens(2 ** 20, 0.5, per_token, 2 ** 30) == 256  # never below one shortest slot
    cpu = GroundingEngine(engine.model, engine.processor, batch=BatchSettings())
    assert cpu.kv_capacity_tokens == CPU_KV_TOKENS and cpu.pool_sized
    fixed = GroundingEngine(engine.model, engine.processor, batch=BatchSettings(max_batch_tokens=4096))
    assert fixed.size_kv_pool(free_bytes=10 * 2 ** 30) == 4096
    auto = GroundingEngine(engine.model, engine.processor,
                           batch=BatchSettings(kv_cache_memory_fraction=0.25, prefix_cache_bytes=2 ** 20))
    auto.pool_sized = False  # as on CUDA before the warm-up
    warm_pool = weakref.ref(auto.runner.cache)
    assert auto.runner.pool_bytes == CPU_KV_TOKENS * per_token
    tokens = auto.size_kv_pool(free_bytes=64 * 2 ** 20)
    assert warm_pool() is None  # the warm-up pool is gone before the sized one is allocated
    assert tokens == int((64 - 1) * 2 ** 20 * 0.25) // per_token == 8064
    assert auto.kv_capacity_tokens == auto.scheduler.limits.capacity_tokens == tokens
    assert auto.runner.cache.capacity_tokens == tokens and auto.pool_sized
    assert auto.ground(engine.prepare(np.full((64, 64, 3), 9, np.uint8), PruneSettings()), "x").generated_tokens
