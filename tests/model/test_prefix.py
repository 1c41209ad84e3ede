"""Prefix KV reuse (fp32, CPU, tiny checkpoint): an answer that starts from a cached prompt prefix equals
the answer computed from scratch (first-step logits and tokens), pruned and unpruned, with two images
per prompt (extend level), after eviction and rebuild; never across keys or other images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, ModelSpec, PruneSettings
from pixelprune.model.generation import Chunk, build_prompt, extend, prompt_chunk
from pixelprune.model.kvcache import SlotKVCache
from pixelprune.model.pipeline import build_inputs, user_message
from pixelprune.model.runner import _Item
from pixelprune.model.step import Prefill
from pixelprune.points import grounding_prompt

ATOL = 2e-5  # fp32: the same sums in another order (the prefix's keys computed in a longer or shorter batch)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> GroundingEngine:
    return GroundingEngine.load(ModelSpec(model=str(tiny_checkpoint), max_new_tokens=6),
                                batch=BatchSettings(max_batch_tokens=2048))


@pytest.fixture(scope="module")
def frames(corpus_dir) -> list[np.ndarray]:
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        web = np.asarray(img.convert("RGB"))
    return [web[100:360, 200:552].copy(), web[500:724, 900:1188].copy()]


def tokens(engine, request) -> tuple[list[int], bool]:
    seq = engine.sequence(request)
    engine.add(seq)
    while not engine.idle:
        engine.step()
    assert seq.error is None
    return seq.tokens, engine.output(seq).prefix_reused


def first_logits(engine, request, entry=None) -> torch.Tensor:
    """The prefill's last-token logits of `request` through the runner's own chunking, on a fresh cache
    row: from scratch, or on top of a copy of `entry`."""
    seq = engine.sequence(request)
    item = _Item(plan=Prefill(seq, 0, None, None, None, None), work=seq.payload, entry=entry,
                 vision=None if entry is not None else engine.encode(request.prepared))
    cache = _cache(engine)
    if entry is not None:
        cache.write(0, entry.kv)
    with torch.inference_mode():
        return extend(engine.model, cache, 0, [engine.runner._chunk(item)])[0]


def _cache(engine) -> SlotKVCache:
    cfg = engine.model.config.text_config
    cache = SlotKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 2048, engine.device, engine.dtype)
    cache.set_layout(1024)
    return cache


@pytest.mark.parametrize("settings", [PruneSettings(), PruneSettings(enabled=False)], ids=["pruned", "unpruned"])
def test_reused_prefix_answers_like_from_scratch(engine, frames, settings):
    prepared = engine.prepare(frames[0], settings)
    key = ("tenant", "frame-0", settings.key, prepared.resized_size)
    cold_a, _ = tokens(engine, GroundRequest(prepared, "Open the menu"))
    cold_b, _ = tokens(engine, GroundRequest(prepared, "Where is the search box?"))
    assert tokens(engine, GroundRequest(prepared, "Open the menu", cache_key=key)) == (cold_a, False)
    entry = engine.runner.prefixes.get(key)
    assert entry is not None and entry.nbytes == entry.length * engine.kv_bytes_per_token
    hit = GroundRequest(prepared, "Where is the search box?", cache_key=key)
    assert tokens(engine, hit) == (cold_b, True)
    assert tokens(engine, GroundRequest(prepared, "Open the menu", cache_key=key)) == (cold_a, True)
    scratch = first_logits(engine, GroundRequest(prepared, "Where is the search box?"))
    reused = first_logits(engine, hit, entry)
    torch.testing.assert_close(reused, scratch, rtol=0, atol=ATOL)
    assert int(reused.argmax()) == int(scratch.argmax()) == cold_b[0]


def test_two_image_prompt_prefix_is_exact(engine, frames):
    """Two images, the prefix ending after the second one's last kept token: the continuation's positions
    come from the stored offsets and give the logits of the whole prompt."""
    inputs = build_inputs(engine.processor, frames, user_message(grounding_prompt("Open the menu"), num_images=2),
                          PruneSettings())
    grids = [tuple(g) for g in inputs.inputs["image_grid_thw"].tolist()]
    with torch.inference_mode():
        vision = engine.adapter.encode_images(inputs.inputs["pixel_values"], inputs.inputs["image_grid_thw"],
                                              list(inputs.keep))
        prompt = build_prompt(engine.model, inputs.inputs["input_ids"], grids, inputs.keep)
        assert prompt.prefix_len == int(torch.nonzero(prompt.visual)[-1]) + 1 and sum(vision.kept_blocks) == int(
            prompt.visual.sum())
        cache = _cache(engine)
        whole = extend(engine.model, cache, 0, [prompt_chunk(prompt, vision)])[0]
        kv, length = cache.read(0, prompt.prefix_len), prompt.prefix_len
        next_mrope = int(prompt.positions[1, length])
        fresh = _cache(engine)
        fresh.write(1, kv)
        steps = torch.arange(prompt.length - length)
        positions = torch.stack((length + steps, next_mrope + steps, next_mrope + steps, next_mrope + steps))
        assert torch.equal(positions, prompt.positions[:, length:])  # the stored offsets give the same positions
        rest = extend(engine.model, fresh, 1, [Chunk(prompt.token_ids[length:], positions, start=length)])[0]
    torch.testing.assert_close(rest, whole, rtol=0, atol=ATOL)


def test_eviction_and_rebuild(tiny_checkpoint, engine, frames):
    one = [engine.prepare(f, PruneSettings()) for f in frames]
    ids = engine.prompt_ids(grounding_prompt("Open the menu"))
    head = int(np.flatnonzero(ids == engine.model.config.image_token_id)[0])  # tokens before the image
    lengths = [head + p.kept_blocks for p in one]  # prefix = template head + visual tokens
    assert max(lengths) < 2 * min(lengths)
    bounded = GroundingEngine(engine.model, engine.processor, max_new_tokens=6, batch=BatchSettings(
        max_batch_tokens=2048, prefix_cache_bytes=max(lengths) * engine.kv_bytes_per_token))  # room for one
    cold = [tokens(bounded, GroundRequest(p, "Open the menu"))[0] for p in one]
    assert tokens(bounded, GroundRequest(one[0], "Open the menu", cache_key="a")) == (cold[0], False)
    assert len(bounded.scheduler.prefixes) == 1 and bounded.prefix_cache_bytes > 0
    assert tokens(bounded, GroundRequest(one[1], "Open the menu", cache_key="b")) == (cold[1], False)
    assert "a" not in bounded.scheduler.prefixes and "b" in bounded.scheduler.prefixes  # evicted
    assert tokens(bounded, GroundRequest(one[0], "Open the menu", cache_key="a")) == (cold[0], False)  # rebuilt
    assert tokens(bounded, GroundRequest(one[0], "Open the menu", cache_key="a")) == (cold[0], True)
    assert bounded.prefix_cache_bytes <= bounded.batch_settings.prefix_cache_bytes


def test_no_reuse_across_keys_or_images(engine, frames):
    first, second = engine.prepare(frames[0], PruneSettings()), engine.prepare(frames[1], PruneSettings())
    cold = tokens(engine, GroundRequest(second, "Open the menu"))[0]
    tokens(engine, GroundRequest(first, "Open the menu", cache_key="shared"))
    assert tokens(engine, GroundRequest(first, "Open the menu", cache_key="other")) == (
        tokens(engine, GroundRequest(first, "Open the menu"))[0], False)
    # a caller bug: one key for another image; the entry's grid and kept count do not match, so it is not used
    assert tokens(engine, GroundRequest(second, "Open the menu", cache_key="shared")) == (cold, False)
    off = GroundingEngine(engine.model, engine.processor, max_new_tokens=6,
                          batch=BatchSettings(max_batch_tokens=2048, prefix_cache_bytes=0))
    tokens(off, GroundRequest(first, "Open the menu", cache_key="k"))
    assert tokens(off, GroundRequest(first, "Open the menu", cache_key="k"))[1] is False
    assert len(off.scheduler.prefixes) == 0 and off.prefix_cache_bytes == 0
