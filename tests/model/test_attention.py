"""The engine's attention paths against the masked paths they replace (tiny checkpoint, fp32, CPU):
prefill per row over its own positions vs a dense 4-D mask, for batched mixed sizes, pruned and unpruned,
and a row that continues a stored prefix; decode over a bucket of the live length vs the whole slot; and
the model's other callers (no slot rows) unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelprune.model.attention import SLOT_ATTENTION
from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, ModelSpec, PruneSettings
from pixelprune.model.generation import (DECODE_KV_MIN, build_prompt, decode_kv_len, decode_step, extend,
                                         prompt_chunk)
from pixelprune.model.kvcache import SlotKVCache
from pixelprune.model.pipeline import tokenize

ATOL = 1e-5


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> GroundingEngine:
    return GroundingEngine.load(ModelSpec(model=str(tiny_checkpoint), max_new_tokens=6),
                                batch=BatchSettings(max_batch_tokens=4096))


@pytest.fixture(scope="module")
def prompts(engine, corpus_dir):
    """(prompt, vision) of crops of three sizes, pruned and unpruned, and three instructions."""
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        web = np.asarray(img.convert("RGB"))
    crops = [web[100:360, 200:552].copy(), web[300:620, 40:296].copy(), web[500:724, 900:1188].copy()]
    out = []
    for i, (crop, settings) in enumerate([(c, s) for c in crops for s in (PruneSettings(), PruneSettings(enabled=False))]):
        prepared = engine.prepare(crop, settings)
        seq = engine.sequence(GroundRequest(prepared, ("Open the menu", "the heading", "Where is the search box?")[i % 3]))
        full = tokenize(engine.processor, None, [prepared.image_grid_thw], ids=seq.payload.ids)
        prompt = build_prompt(engine.model, full["input_ids"], [prepared.image_grid_thw], [prepared.keep])
        out.append((prompt, engine.encode(prepared)))
    return out


def cache_for(engine) -> SlotKVCache:
    cfg = engine.model.config.text_config
    cache = SlotKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4096, engine.device, engine.dtype)
    cache.set_layout(512)
    return cache


def run(engine, chunks, rows, dense: bool, fill=None):
    """Logits and the written rows' caches of one extend on a fresh cache (rows first..; fill: (row, kv) first)."""
    cache = cache_for(engine)
    for row, kv in fill or ():
        cache.write(row, kv)
    with torch.inference_mode():
        logits = extend(engine.model, cache, rows[0], chunks, dense_mask=dense)
    return logits, [cache.read(row, c.start + c.length) for row, c in zip(rows, chunks)]


def test_the_engine_routes_its_text_model_through_slot_attention(engine):
    assert engine.model.config.text_config._attn_implementation == SLOT_ATTENTION
    assert engine.model.config.vision_config._attn_implementation == "sdpa"


def test_prefill_per_row_equals_the_masked_prefill(engine, prompts):
    """Six right-padded rows of different lengths (pruned and unpruned) in one forward."""
    chunks = [prompt_chunk(p, v) for p, v in prompts]
    assert len({c.length for c in chunks}) > 2
    slot, slot_caches = run(engine, chunks, range(6), dense=False)
    masked, masked_caches = run(engine, chunks, range(6), dense=True)
    torch.testing.assert_close(slot, masked, rtol=0, atol=ATOL)
    assert torch.equal(slot.argmax(-1), masked.argmax(-1))
    for a, b in zip(slot_caches, masked_caches):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_a_row_continuing_a_stored_prefix_equals_the_masked_path(engine, prompts):
    """Rows that start after a prefix already in their slots (a prefix hit), beside a whole prompt."""
    (p0, v0), (p1, v1) = prompts[0], prompts[3]
    _, (kv0, kv1) = run(engine, [prompt_chunk(p0, v0), prompt_chunk(p1, v1)], [0, 1], dense=True)
    prefixes = [(1, kv0[:, :, :, :p0.prefix_len]), (2, kv1[:, :, :, :p1.prefix_len])]
    rests = [prompt_chunk(p0, None, start=p0.prefix_len), prompt_chunk(p1, None, start=p1.prefix_len)]
    whole = prompt_chunk(prompts[5][0], prompts[5][1])
    chunks = [whole] + rests
    assert rests[0].start > 0 and rests[1].start != rests[0].start
    slot, slot_caches = run(engine, chunks, [0, 1, 2], dense=False, fill=prefixes)
    masked, masked_caches = run(engine, chunks, [0, 1, 2], dense=True, fill=prefixes)
    torch.testing.assert_close(slot, masked, rtol=0, atol=ATOL)
    for a, b in zip(slot_caches, masked_caches):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_decode_over_the_live_length_equals_decode_over_the_slot(engine, prompts):
    chunks = [prompt_chunk(p, v) for p, v in prompts[:4]]
    cache = cache_for(engine)
    cache.set_layout(1024)
    with torch.inference_mode():
        logits = extend(engine.model, cache, 0, chunks)
        tokens = logits.argmax(-1)
        positions = torch.tensor([c.length for c in chunks])
        mrope = torch.tensor([int(p.positions[1, -1]) + 1 for p, _ in prompts[:4]])
        inputs = torch.stack((tokens, positions, mrope))
        live = decode_kv_len(int(positions.max()) + 1, cache.slot_len)
        assert live < cache.slot_len  # the bucket, not the whole slot
        kv_before = cache.read(2, int(positions[2]) + 1).clone()
        short = decode_step(engine.model, cache, inputs, live)
        short_kv = cache.read(2, int(positions[2]) + 1).clone()
        whole = decode_step(engine.model, cache, inputs, None)
    assert torch.equal(short[0], whole[0])
    torch.testing.assert_close(short[1], whole[1], rtol=0, atol=ATOL)
    assert not torch.equal(kv_before, short_kv)  # the fed token's key/value was written
    assert [decode_kv_len(n, 4096) for n in (1, 256, 257, 700, 3000, 5000)] == [DECODE_KV_MIN, 256, 512, 1024, 4096,
                                                                                4096]


def test_other_callers_of_the_model_are_unchanged(engine, tiny_checkpoint):
    """A padded two-row batch through the model's own forward: the same logits with SLOT_ATTENTION (no slot
    rows: transformers' sdpa with its own masks) as on a fresh sdpa model."""
    from transformers import AutoModelForImageTextToText

    stock = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoint), attn_implementation="sdpa").eval()
    ids = torch.tensor([[40, 41, 42, 43, 44, 45], [0, 0, 40, 41, 42, 43]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.inference_mode():
        ours = engine.model(input_ids=ids, attention_mask=mask).logits
        theirs = stock(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ours[mask.bool()], theirs[mask.bool()])
