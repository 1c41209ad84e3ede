"""The grounding prompt, and reading a click point out of what the model answers.

Qwen3-VL grounds in *relative* coordinates: integers 0..1000 along each axis of
the image it was shown, whatever that image's size in pixels. Because
`smart_resize` scales the whole screenshot (it never crops or pads), a relative
coordinate means the same place in the resized image and in the original
screenshot, so the pixel in the original is simply

    x_px = x / 1000 * original_width,   y_px = y / 1000 * original_height

(continuous pixel coordinates, origin at the top-left corner of the image),
clamped into the image so that a click always lands on an existing pixel.

Models answer in many shapes: JSON (`{"point_2d": [x, y]}`, `{"bbox_2d": [...]}`,
lists of such objects, tool calls whose `arguments` hold the point, inside ```json
fences), `<point>` tags, `click(x=.., y=..)` calls, `point:x,y` fields, or a bare
`(x, y)` / `[x, y]` in prose. `parse_point` tries those forms in that order and returns
the first point that lies within `bounds` (0..1000 by default: other coordinate spaces
pass theirs, see `pixelprune.profiles`); it never raises. `answer_text` drops the
reasoning some models write first (`<think>`, `<grounding_think>`, `<THINK>` blocks).
Pure Python: no numpy, torch or transformers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

RELATIVE_SCALE = 1000.0  # Qwen3-VL's relative coordinate range: 0..1000 on each axis

DEFAULT_GROUNDING_PROMPT = (
    "You are a GUI agent. Locate the user interface element described below in the screenshot "
    "and give the point to click on it.\n"
    "Instruction: {instruction}\n"
    'Answer with JSON only, in the form {"point_2d": [x, y]}, where x and y are relative '
    "coordinates from 0 to 1000 (0 is the left or top edge of the screenshot, 1000 the right "
    "or bottom edge)."
)

INSTRUCTION_PLACEHOLDER = "{instruction}"  # replaced literally (not str.format), so JSON braces are safe

MAX_PARSE_CHARS = 4096  # longer answers are cut: a grounding answer is a few dozen tokens
_MAX_JSON_STARTS = 64  # JSON decode attempts per answer; bounds the work on adversarial text

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_SEP = r"(?:\s*[,;]\s*|\s+)"
_PAIR_IN_BRACKETS = re.compile(rf"[\(\[]\s*({_NUM}){_SEP}({_NUM})\s*[\)\]]")
_QUAD_IN_BRACKETS = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_POINT_TAG = re.compile(
    rf"<point[^>]*>\s*[\(\[]?\s*({_NUM}){_SEP}({_NUM})\s*[\)\]]?\s*</point>", re.IGNORECASE)
_POINT_TAG_ATTRS = re.compile(
    rf"<points?\b[^>]*?\bx1?\s*=\s*[\"']?({_NUM})[\"']?[^>]*?\by1?\s*=\s*[\"']?({_NUM})", re.IGNORECASE)
_BOX_TAG = re.compile(
    rf"<\|box_start\|>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*<\|box_end\|>")
_CLICK_KW = re.compile(
    rf"\b(?:click|tap|double_click|left_click|right_click|move_to|moveTo)\s*\(\s*"
    rf"(?:start_box\s*=\s*)?[\"']?\s*x\s*=\s*({_NUM})\s*,\s*y\s*=\s*({_NUM})", re.IGNORECASE)
_KEY_POINT = re.compile(rf"\bpoint\s*[:=]\s*[\(\[]?\s*({_NUM}){_SEP}({_NUM})", re.IGNORECASE)
_CLICK_POS = re.compile(
    rf"\b(?:click|tap|double_click|left_click|right_click|move_to|moveTo)\s*\(\s*"
    rf"(?:start_box\s*=\s*)?[\"'\(\[]*\s*({_NUM})\s*,\s*({_NUM})", re.IGNORECASE)

# JSON keys holding a point (2 numbers) or a box (4 numbers), most specific first.
_POINT_KEYS = ("point_2d", "point", "click_point", "coordinate", "coordinates", "position")
_BOX_KEYS = ("bbox_2d", "bbox", "box")
_NESTED_KEYS = ("arguments", "action", "parameters")  # tool calls: {"name": .., "arguments": {"coordinate": ..}}

# Reasoning written before the answer: (opening tag, closing tag). Numbers inside are not the answer.
REASONING_TAGS = (("<think>", "</think>"), ("<grounding_think>", "</grounding_think>"), ("<THINK>", "</THINK>"))
_UNFINISHED_NUMBER = re.compile(r"[-+]?\d*\.?\d*$")
Bounds = tuple[float, float]  # largest x and y a point may have (inclusive; the smallest is 0)


@dataclass(frozen=True)
class PointResult:
    x: float  # horizontal coordinate as the model wrote it (default space: 0 left edge .. 1000 right edge)
    y: float  # vertical coordinate as the model wrote it (default space: 0 top edge .. 1000 bottom edge)
    form: str  # which answer form matched: "json_point", "json_bbox", "tag", "box_tag",
    #            "click", "key_point", "bbox", "pair"

    def __iter__(self):
        """Unpacks as `x, y = result`, so a PointResult is accepted wherever an (x, y) pair is."""
        return iter((self.x, self.y))

    @property
    def normalized(self) -> tuple[float, float]:
        """The point in 0..1 on each axis (for the default 0..1000 space)."""
        return normalize_point((self.x, self.y))


def _number(value) -> float | None:
    """A finite float from a JSON number or numeric string, else None (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None


def _in_range(x: float | None, y: float | None, form: str, bounds: Bounds) -> PointResult | None:
    if x is None or y is None or not (0.0 <= x <= bounds[0] and 0.0 <= y <= bounds[1]):
        return None
    return PointResult(x=x, y=y, form=form)


def _from_numbers(values, form_point: str, form_box: str, bounds: Bounds) -> PointResult | None:
    """Two numbers -> the point; four -> the centre of the box; all four must be in range."""
    if not isinstance(values, (list, tuple)) or len(values) not in (2, 4):
        return None
    numbers = [_number(v) for v in values]
    if any(n is None or not 0.0 <= n <= bounds[i % 2] for i, n in enumerate(numbers)):
        return None
    if len(numbers) == 2:
        return _in_range(numbers[0], numbers[1], form_point, bounds)
    return _in_range((numbers[0] + numbers[2]) / 2, (numbers[1] + numbers[3]) / 2, form_box, bounds)


def _from_json_dict(value: dict, bounds: Bounds, depth: int) -> PointResult | None:
    for key in _POINT_KEYS:
        if key in value:
            found = _from_numbers(value[key], "json_point", "json_bbox", bounds)
            if found is not None:
                return found
    for key in _BOX_KEYS:
        if key in value and isinstance(value[key], (list, tuple)) and len(value[key]) == 4:
            found = _from_numbers(value[key], "json_bbox", "json_bbox", bounds)
            if found is not None:
                return found
    if "x" in value and "y" in value:
        return _in_range(_number(value["x"]), _number(value["y"]), "json_point", bounds)
    for key in _NESTED_KEYS:
        if isinstance(value.get(key), dict):
            found = _from_json_value(value[key], bounds, depth + 1)
            if found is not None:
                return found
    return None


def _from_json_value(value, bounds: Bounds, depth: int = 0) -> PointResult | None:
    """The first point in a decoded JSON value: an object with a point/box key (or a tool call's
    arguments holding one), or a list of them."""
    if depth > 4:
        return None
    if isinstance(value, dict):
        return _from_json_dict(value, bounds, depth)
    if isinstance(value, list):
        for item in value[:16]:
            if isinstance(item, (dict, list)):
                found = _from_json_value(item, bounds, depth + 1)
                if found is not None:
                    return found
    return None


def _from_json(text: str, bounds: Bounds) -> PointResult | None:
    """Decode JSON objects/arrays embedded anywhere in the text (fences, prose) and look inside."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[\{\[]", text)][:_MAX_JSON_STARTS]
    for start in starts:
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, (dict, list)):
            found = _from_json_value(value, bounds)
            if found is not None:
                return found
    return None


def _from_regex(pattern: re.Pattern, text: str, form: str, bounds: Bounds) -> PointResult | None:
    for match in pattern.finditer(text):
        found = _in_range(_number(match.group(1)), _number(match.group(2)), form, bounds)
        if found is not None:
            return found
    return None


def _from_quads(pattern: re.Pattern, text: str, form: str, bounds: Bounds) -> PointResult | None:
    for match in pattern.finditer(text):
        found = _from_numbers(match.groups(), form, form, bounds)
        if found is not None:
            return found
    return None


def parse_point(text: str, bounds: Bounds = (RELATIVE_SCALE, RELATIVE_SCALE)) -> PointResult | None:
    """The click point in a model's answer, as the model wrote it, or None.

    Forms, tried in this order (the first one giving a point within `bounds` wins):
    JSON objects with `point_2d` (or `point`, `coordinate`, ..., or `x` and `y`) or `bbox_2d`
    (centre), also inside ```json fences, lists of objects and tool calls (`{"name": ..,
    "arguments": {"coordinate": [x, y]}}`); `<point>x y</point>`, `<point>[x, y]</point>`,
    `<point x="..." y="...">`; Qwen's `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`;
    `click(x=.., y=..)` / `click(x, y)`; `point:x,y`; a bare `[x1, y1, x2, y2]` (centre); a bare
    `(x, y)` / `[x, y]`. `bounds` = the largest (x, y) allowed, 0..1000 by default (Qwen3-VL's
    relative space). Coordinates outside, non-strings and garbage give None; never raises.
    """
    if not isinstance(text, str) or not text:
        return None
    text = text[:MAX_PARSE_CHARS]
    try:
        return (_from_json(text, bounds)
                or _from_regex(_POINT_TAG, text, "tag", bounds)
                or _from_regex(_POINT_TAG_ATTRS, text, "tag", bounds)
                or _from_quads(_BOX_TAG, text, "box_tag", bounds)
                or _from_regex(_CLICK_KW, text, "click", bounds)
                or _from_regex(_CLICK_POS, text, "click", bounds)
                or _from_regex(_KEY_POINT, text, "key_point", bounds)
                or _from_quads(_QUAD_IN_BRACKETS, text, "bbox", bounds)
                or _from_regex(_PAIR_IN_BRACKETS, text, "pair", bounds))
    except (ValueError, OverflowError, RecursionError):
        return None


def answer_text(text: str, partial: bool = False) -> str:
    """The part of a model's text that holds its answer: after the last closing tag of a
    reasoning block (`</think>`, `</grounding_think>`, `</THINK>`), and before a reasoning
    block that is still open (so a number the model is thinking about is never taken as
    its click). `partial`: the text is still being generated, so a number at its very end
    may still grow ("31" of "318"): it is cut off."""
    if not isinstance(text, str):
        return ""
    for opening, closing in REASONING_TAGS:
        if closing in text:
            text = text[text.rindex(closing) + len(closing):]
        if opening in text:
            text = text[:text.index(opening)]
    return _UNFINISHED_NUMBER.sub("", text) if partial else text


def grounding_prompt(instruction: str, template: str | None = None) -> str:
    """The user text for one grounding request: `template` (default DEFAULT_GROUNDING_PROMPT)
    with every `{instruction}` replaced literally by the instruction."""
    template = DEFAULT_GROUNDING_PROMPT if template is None else template
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string")
    if INSTRUCTION_PLACEHOLDER not in template:
        raise ValueError(f"prompt template must contain the placeholder {INSTRUCTION_PLACEHOLDER}")
    return template.replace(INSTRUCTION_PLACEHOLDER, instruction)


def normalize_point(point: tuple[float, float]) -> tuple[float, float]:
    """A 0..1000 relative point -> 0..1 on each axis (clamped)."""
    x, y = point
    return (min(max(x / RELATIVE_SCALE, 0.0), 1.0), min(max(y / RELATIVE_SCALE, 0.0), 1.0))


def point_to_pixels(point: tuple[float, float], original_size: tuple[int, int]) -> tuple[float, float]:
    """A 0..1000 relative point -> pixels of the ORIGINAL screenshot of size (W, H).

    x_px = x / 1000 * W, y_px = y / 1000 * H, clamped into [0, W - 1] x [0, H - 1] so the
    point lies on a pixel of the image. The relative coordinates refer to the whole image
    the model saw, which is the original scaled by smart_resize, so no resized size is needed.
    """
    width, height = original_size
    if width <= 0 or height <= 0:
        raise ValueError(f"original_size must be positive (W, H), got {original_size!r}")
    nx, ny = normalize_point(point)
    return (min(nx * width, width - 1.0), min(ny * height, height - 1.0))
