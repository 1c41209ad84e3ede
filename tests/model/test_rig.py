"""The rigged tiny checkpoint answers any text, repeated tokens included, whatever the prompt, the
screenshot, pruning, batching and prefix reuse; and refuses, in one line, what it cannot answer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, ModelSpec, PruneSettings
from pixelprune.model.processor import load_processor
from pixelprune.model.rig import SELF_PLANES, answer_chain, max_answer_tokens, rig_answer
from pixelprune.model.tiny import TINY_CONFIG, write_tiny_checkpoint
from pixelprune.profiles import GUI_OWL, STEPGUI

REPEATS = '{"point_2d": [500, 500]}'  # the form the old rig refused: repeated tokens


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return load_processor(tiny_checkpoint)


def rigged(base, processor, answer: str, **kwargs) -> GroundingEngine:
    model = copy.deepcopy(base)
    rig_answer(model, processor.tokenizer, answer)
    return GroundingEngine(model, processor, max_new_tokens=130, **kwargs)


@pytest.fixture(scope="module")
def shots(corpus_dir) -> list[np.ndarray]:
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        web = np.asarray(img.convert("RGB"))
    with Image.open(corpus_dir / "mobile_flask_quickstart_1170x2532.png") as img:
        phone = np.asarray(img.convert("RGB"))
    return [web[:300, :500].copy(), web, phone]


def test_self_peak_planes_leave_a_gap_at_every_distance():
    """The rig's self-attention score: 1 at distance 0, at most 0.814 at any distance up to 262,144 positions
    (rotary frequencies of the tiny text config)."""
    text = TINY_CONFIG["text_config"]
    inv_freq = text["rope_theta"] ** (-np.arange(0, text["head_dim"], 2) / text["head_dim"])
    weights = np.asarray(SELF_PLANES)
    assert weights.sum() == pytest.approx(1.0, abs=1e-3)
    distances = np.arange(1, 262_145)
    worst = max(float((np.cos(np.outer(chunk, inv_freq[:len(weights)])) @ weights).max())
                for chunk in np.array_split(distances, 16))
    assert worst < 0.815 * weights.sum()


@pytest.mark.parametrize("answer", [REPEATS, "[600, 300, 684, 336]", "0000000000 0000000000 0000000000",
                                    "<tool_call>\n{\"arguments\": {\"coordinate\": [7, 7]}}\n</tool_call>"])
def test_any_answer_text(base, processor, shots, answer):
    engine = rigged(base, processor, answer)
    out = engine.ground(engine.prepare(shots[0], PruneSettings()), "anything")
    expected = processor.tokenizer(answer)["input_ids"] + [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert out.generated_tokens == len(expected)
    assert out.raw_text == processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_the_longest_answer(base, processor, shots):
    tokenizer = processor.tokenizer
    limit = max_answer_tokens(base.model.language_model.config)
    assert limit == 127
    answer = "".join(str(i % 10) for i in range(limit))  # one token per digit
    assert len(tokenizer(answer)["input_ids"]) == limit
    engine = rigged(base, processor, answer)
    assert engine.ground(engine.prepare(shots[0], PruneSettings()), "x").raw_text == answer
    with pytest.raises(ValueError, match=f"is {limit + 1} tokens; this checkpoint can be rigged to at most {limit}"):
        rig_answer(copy.deepcopy(base), tokenizer, answer + "0")


def test_same_answer_whatever_the_request(base, processor, shots):
    """Long system prompts (GUI-Owl), text around the image (Step-GUI), pruned and unpruned screenshots of three
    sizes in one batch, and a later request reusing a prompt prefix."""
    for profile in (GUI_OWL, STEPGUI):
        engine = rigged(base, processor, REPEATS, profile=profile, batch=BatchSettings(max_batch_tokens=65536))
        settings = [(shots[0], PruneSettings()), (shots[0], PruneSettings(enabled=False)), (shots[1], PruneSettings()),
                    (shots[2], PruneSettings()), (shots[2][:640, :600].copy(), PruneSettings(enabled=False))]
        requests = [GroundRequest(engine.prepare(shot, setting), "the Save button", cache_key=("frame", i))
                    for i, (shot, setting) in enumerate(settings)]
        seqs = [engine.sequence(r) for r in requests]
        for seq in seqs:
            engine.add(seq)
        while not engine.idle:
            engine.step()
        assert [engine.output(s).raw_text for s in seqs] == [REPEATS] * len(requests)
        again = engine.ground(requests[3].prepared, "the Save button", cache_key=("frame", 3))
        assert again.prefix_reused and again.raw_text == REPEATS
        # Step-GUI's instruction comes before the image: another instruction is another prefix (only the ViT is
        # reused); GUI-Owl's comes after it: the screen's prefix serves every instruction.
        other = engine.ground(requests[3].prepared, "another instruction", cache_key=("frame", 3))
        assert (other.prefix_reused, other.vision_reused, other.raw_text) == (profile is GUI_OWL, True, REPEATS)


def test_refused_answers(base, processor):
    tokenizer = processor.tokenizer
    for answer, message in (("", "non-empty"), ("ok<|im_end|>", "control tokens, found <|im_end|>"),
                            ("<|im_start|>x", "control tokens, found <|im_start|>")):
        with pytest.raises(ValueError, match=message):
            rig_answer(copy.deepcopy(base), tokenizer, answer)
    # One hidden axis per distinct answer token: a 30-wide model (2 + 16 heads' axes) holds 11 and <|im_end|>.
    narrow = SimpleNamespace(**{**base.model.language_model.config.to_dict(), "hidden_size": 30})
    assert len(answer_chain(tokenizer, "abcdefghijkl", narrow)) == 12  # 11 tokens ("ab" is one)
    with pytest.raises(ValueError, match="uses 12 distinct tokens; at most 11 fit"):
        answer_chain(tokenizer, "abcdefghijklm", narrow)


def test_moe_rig(tmp_path, shots):
    """The MoE checkpoint's last layer: the staircase in the two experts the router picks for every token."""
    out = write_tiny_checkpoint(tmp_path / "moe", answer=REPEATS, arch="qwen3_vl_moe")
    engine = GroundingEngine.load(ModelSpec(model=str(out), max_new_tokens=30))
    assert type(engine.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert engine.ground(engine.prepare(shots[0], PruneSettings()), "x").raw_text == REPEATS
