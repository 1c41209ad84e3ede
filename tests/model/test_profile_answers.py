"""For every model family: a tiny checkpoint rigged to answer in that family's form, loaded with its
profile, puts the click on the exact pixel of screenshots of several sizes (a crop, full HD, a HiDPI
laptop and a phone), through pruning and the engine's batch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixelprune.model.engine import GroundingEngine, ModelSpec, PruneSettings
from pixelprune.model.tiny import write_tiny_checkpoint
from pixelprune.profiles import PROFILES

# Each family's answer form, meaning x = 642, y = 318 of its 0..1000 space (reasoning included where the family
# reasons first; numbers in the reasoning must not be taken).
ANSWERS = {
    "qwen3-vl": '{"point_2d": [642, 318]}',
    "gui-owl": '<tool_call>\n{"name": "computer_use", "arguments": {"action": "left_click", "coordinate": [642, 318]}}'
               "\n</tool_call>",
    "ui-venus": "[642,318]",
    "mai-ui": '<grounding_think>near [10,20]</grounding_think>\n<answer>\n{"coordinate": [642,318]}\n</answer>',
    "stepgui": "<THINK> (5, 5) </THINK>\nexplain:ok\taction:CLICK\tpoint:642,318\tsummary:ok",
    "holo2": '{"x": 642, "y": 318}',
}
# (corpus file, crop box or None = the whole screenshot); two per family, all sizes covered.
SHOTS = {
    "qwen3-vl": ("web_django_models_2880x1800.png", None),
    "gui-owl": ("desktop_pcmanfm_xterm_mousepad_1920x1080.png", None),
    "ui-venus": ("mobile_flask_quickstart_1170x2532.png", None),
    "mai-ui": ("desktop_calc_pivot_terminal_2560x1440.png", None),
    "stepgui": ("mobile_apache_mod_rewrite_1080x2340.png", None),
    "holo2": ("web_django_models_2880x1800.png", (0, 0, 1440, 900)),
}
CROP = ("web_python_tutorial_classes_1920x1080.png", (200, 100, 700, 400))  # 500 x 300


def load(corpus_dir, name, box) -> np.ndarray:
    with Image.open(corpus_dir / name) as img:
        img = img.convert("RGB")
        return np.asarray(img.crop(box) if box else img).copy()


@pytest.mark.parametrize("family", list(ANSWERS))
def test_rigged_family_answer_lands_on_the_exact_pixel(tmp_path_factory, corpus_dir, family):
    out = write_tiny_checkpoint(tmp_path_factory.mktemp(family), answer=ANSWERS[family])
    engine = GroundingEngine.load(ModelSpec(model=str(out), profile=family, max_new_tokens=128))
    assert engine.profile is PROFILES[family]
    tokenizer = engine.processor.tokenizer
    for corpus_file, box in (CROP, SHOTS[family]):
        shot = load(corpus_dir, corpus_file, box)
        height, width = shot.shape[:2]
        out = engine.ground(engine.prepare(shot, PruneSettings()), "the Save button")
        assert out.raw_text == tokenizer.decode(tokenizer(ANSWERS[family])["input_ids"], skip_special_tokens=True)
        assert out.point == (642 / 1000 * width, 318 / 1000 * height), (family, corpus_file)
        assert out.point_normalized == (0.642, 0.318)


def test_the_same_answer_means_another_pixel_in_another_family(tmp_path, corpus_dir):
    """One checkpoint answering "[642,318]": UI-Venus reads a point in 0..1000; Qwen3-VL's default profile reads
    the same; a profile never silently maps into the wrong space (no point rather than a wrong one)."""
    out = write_tiny_checkpoint(tmp_path / "venus", answer="[1500, 318]")
    shot = load(corpus_dir, *CROP)
    for family in ("ui-venus", "qwen3-vl"):
        engine = GroundingEngine.load(ModelSpec(model=str(out), profile=family, max_new_tokens=16))
        result = engine.ground(engine.prepare(shot, PruneSettings()), "x")
        assert result.raw_text == "[1500, 318]" and result.point is None  # 1500 is outside 0..1000
