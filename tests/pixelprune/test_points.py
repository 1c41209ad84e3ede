"""Point parsing on real-looking model answers, and the mapping back to screenshot pixels."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pixelprune.points import (
    DEFAULT_GROUNDING_PROMPT,
    PointResult,
    answer_text,
    grounding_prompt,
    normalize_point,
    parse_point,
    point_to_pixels,
)

ANSWERS = [
    # (answer, expected x, expected y, form)
    ('{"point_2d": [512, 87]}', 512, 87, "json_point"),
    ('```json\n[\n\t{"point_2d": [734, 215], "label": "Search box"}\n]\n```', 734, 215, "json_point"),
    ('```json\n{"point_2d": [12, 990]}\n```', 12, 990, "json_point"),
    ('[{"point_2d": [100, 200], "label": "File"}, {"point_2d": [300, 400], "label": "Edit"}]',
     100, 200, "json_point"),
    ('The "Save" button is here: {"point_2d": [881, 45], "label": "Save"}. Click it.', 881, 45, "json_point"),
    ('```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "OK button"}]\n```', 200, 300, "json_bbox"),
    ('{"bbox_2d": [0, 0, 1000, 1000]}', 500, 500, "json_bbox"),
    ('{"point_2d": ["640", "360"]}', 640, 360, "json_point"),
    ('{"action": "click", "coordinate": [455, 612]}', 455, 612, "json_point"),
    ('{"point_2d": [250.5, 749.5]}', 250.5, 749.5, "json_point"),
    ("<point>432 118</point>", 432, 118, "tag"),
    ("The menu icon <point>[27, 33]</point> opens settings.", 27, 33, "tag"),
    ("<point>(600, 480)</point>", 600, 480, "tag"),
    ('<points x1="61.5" y1="40.6" alt="Submit">Submit</points>', 61.5, 40.6, "tag"),
    ("<|box_start|>(120,340),(180,360)<|box_end|>", 150, 350, "box_tag"),
    ("click(x=512, y=300)", 512, 300, "click"),
    ("Action: pyautogui.click(x=78, y=923)", 78, 923, "click"),
    ("I will tap(640, 51) to open the tab.", 640, 51, "click"),
    ("click(start_box='(501,212)')", 501, 212, "click"),
    ("The button is located at (512, 87).", 512, 87, "pair"),
    ("Coordinates: [999, 1]", 999, 1, "pair"),
    ("The answer is [210, 330, 250, 370] on the screen.", 230, 350, "bbox"),
    ("(0, 1000)", 0, 1000, "pair"),
    ('Out of range first {"point_2d": [1200, 40]} then (300, 400)', 300, 400, "pair"),
]


@pytest.mark.parametrize("answer, x, y, form", ANSWERS)
def test_parse_point_table(answer, x, y, form):
    assert parse_point(answer) == PointResult(x=float(x), y=float(y), form=form)


@pytest.mark.parametrize("answer", [
    "", "I cannot find that element.", '{"point_2d": [1001, 5]}', '{"point_2d": [-3, 5]}',
    "(1500, 200)", '{"point_2d": [1, 2, 3]}', '{"point_2d": [true, false]}', "[[[[[[", "{" * 3000,
    '{"point_2d": [NaN, 5]}', '{"bbox_2d": [10, 20, 30, 4000]}', "<point>abc def</point>",
    '{"point_2d": ["1e999", 5]}', "click(x=, y=)",
])
def test_parse_point_rejects_garbage(answer):
    assert parse_point(answer) is None


@pytest.mark.parametrize("value", [None, 42, b'{"point_2d": [1, 2]}', ["(1, 2)"]])
def test_parse_point_non_strings_give_none(value):
    assert parse_point(value) is None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_point_never_raises_and_stays_in_range(text):
    result = parse_point(text)
    assert result is None or (0 <= result.x <= 1000 and 0 <= result.y <= 1000)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1000), st.integers(0, 1000), st.text(alphabet=st.characters(blacklist_characters="[]{}()<>,0123456789"), max_size=30))
def test_parse_point_round_trips_json_with_prose(x, y, prose):
    assert parse_point(f'{prose}{{"point_2d": [{x}, {y}]}}{prose}') == PointResult(float(x), float(y), "json_point")


def test_prompt_substitutes_instruction_literally():
    text = grounding_prompt("the {weird} OK button")
    assert "the {weird} OK button" in text and '{"point_2d": [x, y]}' in text
    assert "{instruction}" in DEFAULT_GROUNDING_PROMPT
    assert grounding_prompt("Save", "Click {instruction}; again {instruction}") == "Click Save; again Save"
    with pytest.raises(ValueError, match="placeholder"):
        grounding_prompt("Save", "no placeholder here")
    with pytest.raises(ValueError, match="non-empty"):
        grounding_prompt("  ")


def test_point_to_pixels_exact_values():
    assert point_to_pixels((500, 500), (1920, 1080)) == (960.0, 540.0)
    assert point_to_pixels((250, 750), (1170, 2532)) == (292.5, 1899.0)
    assert point_to_pixels((0, 0), (1170, 2532)) == (0.0, 0.0)
    # 1000 is the far edge: clamped onto the last pixel
    assert point_to_pixels((1000, 1000), (1170, 2532)) == (1169.0, 2531.0)
    assert normalize_point((250, 1000)) == (0.25, 1.0)
    found = parse_point('{"point_2d": [250, 750]}')
    assert found.normalized == (0.25, 0.75) and tuple(found) == (250.0, 750.0)
    assert point_to_pixels(found, (1170, 2532)) == (292.5, 1899.0)
    with pytest.raises(ValueError):
        point_to_pixels((1, 1), (0, 10))


def test_mapping_back_through_resize_of_a_phone_screenshot():
    """A 1170x2532 screenshot is shown to the model as 1184x2528 (smart_resize). The model
    names a target by its position relative to the image it saw; mapping that relative point
    to the original must land on the same place of the original screenshot."""
    original, resized = (1170, 2532), (1184, 2528)
    for xr, yr in [(592, 1264), (37, 2000), (1100, 64)]:  # pixels of the resized image
        relative = (xr / resized[0] * 1000, yr / resized[1] * 1000)
        x, y = point_to_pixels(relative, original)
        assert x == pytest.approx(xr * original[0] / resized[0], abs=1e-9)
        assert y == pytest.approx(yr * original[1] / resized[1], abs=1e-9)
    # the centre of the resized image is the centre of the original
    assert point_to_pixels((592 / 1184 * 1000, 1264 / 2528 * 1000), original) == (585.0, 1266.0)
    try:
        from pixelprune.geometry import to_original
    except ImportError:
        return
    for xr, yr in [(592, 1264), (37, 2000)]:
        expected = to_original(xr, yr, original_size=original, resized_size=resized)
        got = point_to_pixels((xr / resized[0] * 1000, yr / resized[1] * 1000), original)
        assert got == pytest.approx(expected, abs=1e-6)


def test_bounds_choose_the_coordinate_space():
    """0..1000 by default; other spaces pass their own largest x and y."""
    assert parse_point("(999, 999)", bounds=(999.0, 999.0)) == PointResult(999, 999, "pair")
    assert parse_point("(1000, 5)", bounds=(999.0, 999.0)) is None
    assert parse_point("[1500, 20]", bounds=(1920.0, 1088.0)) == PointResult(1500, 20, "pair")
    assert parse_point("[1500, 20]") is None
    assert parse_point("[100, 200, 1900, 1000]", bounds=(1920.0, 1088.0)) == PointResult(1000, 600, "bbox")
    assert parse_point("[100, 200, 1900, 1100]", bounds=(1920.0, 1088.0)) is None  # y2 beyond the height


def test_tool_calls_and_point_fields():
    call = ('<tool_call>\n{"name": "computer_use", "arguments": {"action": "left_click", "coordinate": [642, 318]}}'
            "\n</tool_call>")
    assert parse_point(call) == PointResult(642, 318, "json_point")
    assert parse_point('{"name": "x", "arguments": {"action": "wait"}}') is None
    assert parse_point("explain:点击\taction:CLICK\tpoint:642,318\tsummary:done") == PointResult(642, 318, "key_point")
    assert parse_point("point: (12 34)") == PointResult(12, 34, "key_point")


def test_answer_text_drops_reasoning():
    assert answer_text("<think>maybe (1, 2)</think>\n(642, 318)") == "\n(642, 318)"
    assert answer_text("reasoning (1, 2)</think>(3, 4)") == "(3, 4)"  # the template opened the block
    assert answer_text("<grounding_think>still at (1, 2)") == ""
    assert answer_text("<THINK> a </THINK>\npoint:1,2") == "\npoint:1,2"
    assert answer_text("point:642,31", partial=True) == "point:642,"
    assert answer_text("(642, 318)", partial=True) == "(642, 318)"
    assert answer_text(None) == ""
