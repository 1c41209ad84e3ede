"""Model profiles (pure Python): each family's user turn, its answer forms mapped to screenshot pixels
in its coordinate space, and the choice of profile from a checkpoint's name, config and card."""

from __future__ import annotations

import json

import pytest

from pixelprune.points import DEFAULT_GROUNDING_PROMPT
from pixelprune.profiles import (
    AUTO, GUI_OWL, HOLO2, MAI_UI, PROFILES, QWEN3_VL, RELATIVE_999, RESIZED_PIXELS, STEPGUI, UI_VENUS,
    ModelProfile, checkpoint_hints, get_profile, resolve_profile,
)

SIZES = [  # (original W, H), (resized w, h): a crop, full HD, a HiDPI (Retina) laptop, a phone
    ((500, 300), (512, 320)), ((1920, 1080), (1920, 1088)), ((2880, 1800), (2880, 1792)), ((1170, 2532), (1184, 2528))]

# A model's answer in each family's documented form, all meaning x = 642, y = 318 of the family's space.
ANSWERS = {
    "qwen3-vl": '```json\n[{"point_2d": [642, 318], "label": "Save"}]\n```',
    "gui-owl": '<tool_call>\n{"name": "computer_use", "arguments": {"action": "left_click", "coordinate": [642, 318]}}'
               "\n</tool_call>",
    "ui-venus": "[642,318]",
    "mai-ui": '<grounding_think>The Save icon sits left of [10,20], top row.</grounding_think>\n<answer>\n'
              '{"coordinate": [642,318]}\n</answer>',
    "stepgui": "<THINK> 保存按钮在 (10, 20) 右边 </THINK>\nexplain:点击保存\taction:CLICK\tpoint:642,318\tsummary:已点击保存",
    "holo2": '{"x": 642, "y": 318}',
}


def test_every_family_has_its_profile_and_source():
    assert list(PROFILES) == ["qwen3-vl", "gui-owl", "ui-venus", "mai-ui", "stepgui", "holo2"]
    for profile in PROFILES.values():
        assert profile.source.startswith("https://github.com/") and profile.models and profile.unverified
        assert profile.user_template.count("{image}") == 1 and "{instruction}" in profile.user_template
    assert {p.coordinates.scale for p in PROFILES.values()} == {1000.0}


@pytest.mark.parametrize("name", list(ANSWERS))
@pytest.mark.parametrize("original, resized", SIZES)
def test_each_family_answer_maps_to_the_exact_pixel(name, original, resized):
    (width, height), profile = original, PROFILES[name]
    found = profile.point(ANSWERS[name], resized, original)
    assert found.raw == (642, 318)
    assert found.normalized == (0.642, 0.318)
    assert found.pixels == (0.642 * width, 0.318 * height)


def test_box_answers_give_their_centre_and_edges_stay_on_the_image():
    assert UI_VENUS.point("[600, 300, 684, 336]", (512, 320), (500, 300)).pixels == (0.642 * 500, 0.318 * 300)
    assert QWEN3_VL.point('{"bbox_2d": [600, 300, 684, 336]}', (512, 320), (500, 300)).raw == (642, 318)
    assert HOLO2.point('{"x": 1000, "y": 1000}', (512, 320), (500, 300)).pixels == (499.0, 299.0)
    assert UI_VENUS.point("[-1,-1]", (512, 320), (500, 300)) is None  # UI-Venus' "infeasible"


def test_reasoning_is_never_the_answer():
    thinking = '<grounding_think>the icon near [10,20]'
    assert MAI_UI.point(thinking, (512, 320), (500, 300)) is None  # still thinking: no point yet
    assert MAI_UI.point(thinking + "</grounding_think><answer>[642,318]</answer>", (512, 320), (500, 300)).raw == (
        642, 318)
    assert STEPGUI.point("<THINK> (10, 20) </THINK>\naction:CLICK\tpoint:642,318", (512, 320), (500, 300)).raw == (
        642, 318)
    assert QWEN3_VL.point("<think>(1, 2)</think>\n\n(642, 318)", (512, 320), (500, 300)).raw == (642, 318)


def test_partial_answers_wait_for_the_last_number():
    """While generating, `point:642,31` may still become 318: a trailing number is not taken."""
    assert STEPGUI.point("action:CLICK\tpoint:642,31", (512, 320), (500, 300), partial=True) is None
    assert STEPGUI.point("action:CLICK\tpoint:642,31", (512, 320), (500, 300)).raw == (642, 31)
    assert STEPGUI.point("action:CLICK\tpoint:642,318\t", (512, 320), (500, 300), partial=True).raw == (642, 318)
    assert QWEN3_VL.point("(642, 318)", (512, 320), (500, 300), partial=True).raw == (642, 318)


def test_coordinate_spaces():
    """0..999: the right edge is 999; resized pixels: the model saw the resized image (w, h)."""
    assert RELATIVE_999.normalize(999, 499.5, (512, 320)) == (1.0, 0.5)
    assert RESIZED_PIXELS.bounds((512, 320)) == (512.0, 320.0)
    for space, answer, pixel in ((RELATIVE_999, "(999, 333)", (1919.0, 360.0)),
                                 (RESIZED_PIXELS, "(480, 272)", (480 / 1920 * 1920, 272 / 1088 * 1080))):
        profile = ModelProfile(name="x", family="x", models=(), source="x", system_prompt=None,
                               user_template="{image}{instruction}", coordinates=space, answer=QWEN3_VL.answer)
        assert profile.point(answer, (1920, 1088), (1920, 1080)).pixels == pytest.approx(pixel, abs=1e-9)
    # A relative space's bounds refuse numbers beyond its edge; resized pixels accept up to the width.
    profile = ModelProfile(name="x", family="x", models=(), source="x", system_prompt=None,
                           user_template="{image}{instruction}", coordinates=RESIZED_PIXELS, answer=QWEN3_VL.answer)
    assert profile.point("(1500, 20)", (1920, 1088), (1920, 1080)).raw == (1500, 20)
    assert QWEN3_VL.point("(1500, 20)", (1920, 1088), (1920, 1080)) is None


def test_user_turns():
    assert QWEN3_VL.prompt("Save") == ("", DEFAULT_GROUNDING_PROMPT.replace("{instruction}", "Save"))
    assert GUI_OWL.prompt("the Save button") == ("", "the Save button")
    assert MAI_UI.prompt("the Save button") == ("the Save button\n", "")  # text before the image
    assert UI_VENUS.prompt("Click Save.")[1].startswith("Output the center point of the position corresponding to "
                                                         "the following instruction: \nClick Save. \n\n")
    before, after = STEPGUI.prompt("打开设置")
    assert "已知用户任务为：打开设置\n" in before and before.endswith("当前手机屏幕截图如下：\n")
    assert after.startswith("\n在执行操作之前") and after.endswith("\tsummary:执行完当前步骤后的新历史总结\n")
    assert HOLO2.prompt("the Save button")[1].endswith("     Your target is:\nthe Save button")
    assert HOLO2.chat_template_kwargs == {"thinking": False} and QWEN3_VL.chat_template_kwargs == {}


def test_custom_templates_and_literal_instructions():
    """A request's own template keeps the family's image side; an instruction is text, even '{image}'."""
    assert MAI_UI.prompt("Save", "Find: {instruction}") == ("Find: Save", "")
    assert QWEN3_VL.prompt("Save", "Find: {instruction}") == ("", "Find: Save")
    assert QWEN3_VL.prompt("Save", "Look {image} then find {instruction}") == ("Look ", " then find Save")
    assert QWEN3_VL.prompt("{image} and {instruction}") == ("", DEFAULT_GROUNDING_PROMPT.replace(
        "{instruction}", "{image} and {instruction}"))
    messages = MAI_UI.messages(MAI_UI.prompt("x"))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == [{"type": "text", "text": "x\n"}, {"type": "image"}]
    assert QWEN3_VL.messages("hi", num_images=2) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}]
    for bad in (lambda: QWEN3_VL.prompt(""), lambda: QWEN3_VL.prompt("x", "no placeholder"),
                lambda: QWEN3_VL.prompt("x", "{image}{image}{instruction}"),
                lambda: QWEN3_VL.point("(1, 2)", (32, 32), (0, 10))):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="user template"):
        ModelProfile(name="x", family="x", models=(), source="x", system_prompt=None, user_template="{instruction}",
                     coordinates=RELATIVE_999, answer=QWEN3_VL.answer)


@pytest.mark.parametrize("model, expected", [
    ("Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl"), ("mPLUG/GUI-Owl-1.5-8B-Instruct", "gui-owl"),
    ("inclusionAI/UI-Venus-1.5-30B-A3B", "ui-venus"), ("Tongyi-MAI/MAI-UI-8B", "mai-ui"),
    ("stepfun-ai/GELab-Zero-4B-preview", "stepgui"), ("Hcompany/Holo2-30B-A3B", "holo2"),
    ("/models/tiny-holo2", "holo2"), ("./checkpoints/run-7", "qwen3-vl")])
def test_auto_reads_the_checkpoint_name(model, expected):
    profile, reason = resolve_profile(AUTO, model)
    assert profile.name == expected and reason.startswith("auto")


def test_named_profiles_and_unknown_names():
    assert resolve_profile("mai-ui", "mPLUG/GUI-Owl-1.5-8B-Instruct") == (MAI_UI, "asked for")
    assert get_profile("holo2") is HOLO2
    with pytest.raises(ValueError) as info:
        resolve_profile("gui_owl", "x")
    assert str(info.value) == ("unknown profile 'gui_owl'; expected auto or one of qwen3-vl, gui-owl, ui-venus, "
                               "mai-ui, stepgui, holo2")


def test_auto_reads_a_local_checkpoints_config_and_card(tmp_path):
    card = tmp_path / "finetune"
    card.mkdir()
    (card / "README.md").write_text("---\nbase_model:\n- inclusionAI/UI-Venus-1.5-8B\n---\n# our fine-tune\n")
    assert checkpoint_hints(str(card)) == ["base_model:\n- inclusionAI/UI-Venus-1.5-8B"]
    assert resolve_profile(AUTO, str(card), checkpoint_hints(str(card)))[0] is UI_VENUS
    named = tmp_path / "exported"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "Hcompany/Holo2-8B", "model_type": "qwen3_vl"}))
    (named / "README.md").write_text("# no header; mentions GUI-Owl only in prose\n")
    assert checkpoint_hints(str(named)) == ["Hcompany/Holo2-8B"]
    assert resolve_profile(AUTO, str(named), checkpoint_hints(str(named))) == (HOLO2, "auto: 'holo2' in its config "
                                                                                      "or card")
    assert checkpoint_hints(str(tmp_path / "missing")) == [] and checkpoint_hints("Qwen/Qwen3-VL-2B-Instruct") == []
