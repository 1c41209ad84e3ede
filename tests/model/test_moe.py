"""The mixture-of-experts variant (`qwen3_vl_moe`, tiny checkpoint `--arch qwen3_vl_moe`): with nothing
pruned the adapter is the stock model bit for bit; pruned, its logits are the slow construction of the
pruned prompt (kept tokens, the full image's MRoPE positions, ViT on kept patches); batched prefill and
decoding equal each request alone, on logits and on the key/value cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from pixelprune.model.adapter import PrunedQwen3VL
from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, ModelSpec, PruneSettings
from pixelprune.model.generation import build_prompt, extend, prompt_chunk
from pixelprune.model.kvcache import SlotKVCache
from pixelprune.model.pipeline import tokenize
from pixelprune.model.processor import load_processor
from pixelprune.model.tiny import write_tiny_checkpoint
from pixelprune.selectors import select_blocks


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moe"), seed=1, arch="qwen3_vl_moe")


@pytest.fixture(scope="module")
def model(moe_checkpoint):
    return AutoModelForImageTextToText.from_pretrained(moe_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(moe_checkpoint):
    return load_processor(moe_checkpoint)


@pytest.fixture(scope="module")
def crops(corpus_dir) -> list[Image.Image]:
    """320x256 and 256x288 crops of real screenshots (multiples of 32: the processor keeps them)."""
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        web = img.convert("RGB").crop((0, 0, 320, 256))
    with Image.open(corpus_dir / "desktop_pcmanfm_xterm_mousepad_1920x1080.png") as img:
        desk = img.convert("RGB").crop((40, 300, 296, 588))
    return [web, desk]


def inputs_for(processor, image):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "Click Save."}]}],
                                         tokenize=False, add_generation_prompt=True)
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


def kept_columns_and_mrope(input_ids, image_token_id, grid, keep):
    """Slow reference: the kept columns, and the (3, L) MRoPE ids of the FULL sequence at them (Qwen3-VL's rule:
    text advances by 1, an image's tokens get (t, t + row, t + col) and then the text jumps max(h, w) / 2)."""
    ids, flat = input_ids.tolist(), iter(keep.reshape(-1).tolist())
    cols, pos, out, i = [], 0, [], 0
    _, h, w = grid
    while i < len(ids):
        if ids[i] != image_token_id:
            out.append([pos, pos, pos])
            cols.append(i)
            pos, i = pos + 1, i + 1
            continue
        for r in range(h // 2):
            for c in range(w // 2):
                if next(flat):
                    cols.append(i)
                out.append([pos, pos + r, pos + c])
                i += 1
        pos += max(h, w) // 2
    return cols, torch.tensor(out).T[:, cols]


def test_keep_all_is_bit_identical_to_stock(model, processor, crops):
    adapter = PrunedQwen3VL(model, PruneSettings(enabled=False))
    inp = inputs_for(processor, crops[0])
    _, h, w = inp["image_grid_thw"][0].tolist()
    with torch.no_grad():
        stock = model(**inp).logits
        assert torch.equal(adapter(**inp).logits, stock)
        assert torch.equal(adapter(**inp, keep=[np.ones((h // 2, w // 2), bool)]).logits, stock)
        ours = adapter.generate(**inp, max_new_tokens=6, do_sample=False)
        theirs = model.generate(**inp, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_pruned_logits_equal_the_slow_construction(model, processor, crops):
    """Prefill and five cached decode steps of the pruned prompt equal uncached forward passes of the model on
    the kept tokens, with positions and ViT features built independently."""
    inp = inputs_for(processor, crops[0])
    keep = select_blocks(np.asarray(crops[0]))
    assert 0 < keep.sum() < keep.size
    adapter = PrunedQwen3VL(model)
    image_id = model.config.image_token_id
    cols, mrope = kept_columns_and_mrope(inp["input_ids"][0], image_id, inp["image_grid_thw"][0].tolist(), keep)
    vision = adapter.encode_images(inp["pixel_values"], inp["image_grid_thw"], [keep])
    assert vision.embeds[0].shape[0] == int(keep.sum())
    out = adapter.generate(**inp, vision=vision, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
    new = out.sequences[0, len(cols):]
    for step in range(5):
        ids = torch.cat([inp["input_ids"][0, cols], new[:step]])[None]
        steps = mrope.max() + 1 + torch.arange(step).expand(3, -1)
        positions = torch.cat([torch.arange(ids.shape[1])[None], torch.cat([mrope, steps], dim=1)])[:, None]
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                        mm_token_type_ids=(ids == image_id).long(), use_cache=False,
                        mm_encoder_outputs={"image": vision.encoder_output()}).logits[0, -1]
        torch.testing.assert_close(out.logits[step][0], ref, rtol=0, atol=1e-5)
        assert int(ref.argmax()) == int(new[step])


def test_batched_prefill_equals_each_alone_on_logits_and_cache(model, processor, moe_checkpoint, crops):
    engine = GroundingEngine.load(ModelSpec(model=str(moe_checkpoint), max_new_tokens=6),
                                  batch=BatchSettings(max_batch_tokens=4096))
    chunks = []
    for image, settings in ((crops[0], PruneSettings()), (crops[1], PruneSettings()),
                            (crops[0], PruneSettings(enabled=False))):
        prepared = engine.prepare(np.asarray(image), settings)
        ids = engine.prompt_ids(engine.profile.prompt("Click the Save button"))
        full = tokenize(processor, None, [prepared.image_grid_thw], ids=ids)
        prompt = build_prompt(model, full["input_ids"], [prepared.image_grid_thw], [prepared.keep])
        chunks.append(prompt_chunk(prompt, engine.encode(prepared)))

    def new_cache():
        cfg = model.config.text_config
        cache = SlotKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4096, "cpu", torch.float32)
        cache.set_layout(1024)
        return cache

    with torch.inference_mode():
        batched_cache = new_cache()
        batched = extend(model, batched_cache, 0, chunks)
        for row, chunk in enumerate(chunks):
            alone_cache = new_cache()
            alone = extend(model, alone_cache, 0, [chunk])
            torch.testing.assert_close(batched[row], alone[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(batched_cache.read(row, chunk.length), alone_cache.read(0, chunk.length),
                                       rtol=0, atol=1e-5)


def test_batched_decoding_equals_each_alone(moe_checkpoint, crops):
    engine = GroundingEngine.load(ModelSpec(model=str(moe_checkpoint), max_new_tokens=6),
                                  batch=BatchSettings(max_batch_tokens=4096))
    assert type(engine.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    requests = [GroundRequest(engine.prepare(np.asarray(image), settings), text, max_new_tokens=budget)
                for image, settings, text, budget in (
                    (crops[0], PruneSettings(), "Open the menu", 6), (crops[1], PruneSettings(), "the terminal", 3),
                    (crops[0], PruneSettings(enabled=False), "Open the menu", 6))]
    alone = [engine.ground(r.prepared, r.instruction, max_new_tokens=r.max_new_tokens) for r in requests]
    seqs = [engine.sequence(r) for r in requests]
    for seq in seqs:
        engine.add(seq)
    while not engine.idle:
        engine.step()
    outputs = [engine.output(s) for s in seqs]
    assert [o.raw_text for o in outputs] == [a.raw_text for a in alone]
    assert [o.generated_tokens for o in outputs] == [a.generated_tokens for a in alone]
    assert [o.answer_logprob for o in outputs] == pytest.approx([a.answer_logprob for a in alone], abs=1e-4)
    assert engine.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4  # the MoE text model's attention: as the dense one's
