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
lists of such objects, inside ```json fences), `<point>` tags, `click(x=.., y=..)`
calls, or a bare `(x, y)` / `[x, y]` in prose. `parse_point` tries those forms in
that order and returns the first point that lies in 0..1000; it never raises.
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
_CLICK_POS = re.compile(
    rf"\b(?:click|tap|double_click|left_click|right_click|move_to|moveTo)\s*\(\s*"
    rf"(?:start_box\s*=\s*)?[\"'\(\[]*\s*({_NUM})\s*,\s*({_NUM})", re.IGNORECASE)

# JSON keys holding a point (2 numbers) or a box (4 numbers), most specific first.
_POINT_KEYS = ("point_2d", "point", "click_point", "coordinate", "coordinates", "position")
_BOX_KEYS = ("bbox_2d", "bbox", "box")


@dataclass(frozen=True)
class PointResult:
    x: float  # horizontal relative coordinate, 0 (left edge) .. 1000 (right edge)
    y: float  # vertical relative coordinate, 0 (top edge) .. 1000 (bottom edge)
    form: str  # which answer form matched: "json_point", "json_bbox", "tag", "box_tag",
    #            "click", "bbox", "pair"

    def __iter__(self):
        """Unpacks as `x, y = result`, so a PointResult is accepted wherever an (x, y) pair is."""
        return iter((self.x, self.y))

    @property
    def normalized(self) -> tuple[float, float]:
        """The point in 0..1 on each axis."""
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


def _in_range(x: float | None, y: float | None, form: str) -> PointResult | None:
    if x is None or y is None or not (0.0 <= x <= RELATIVE_SCALE and 0.0 <= y <= RELATIVE_SCALE):
        return None
    return PointResult(x=x, y=y, form=form)


def _from_numbers(values, form_point: str, form_box: str) -> PointResult | None:
    """Two numbers -> the point; four -> the centre of the box; all four must be in range."""
    if not isinstance(values, (list, tuple)) or len(values) not in (2, 4):
        return None
    numbers = [_number(v) for v in values]
    if any(n is None or not 0.0 <= n <= RELATIVE_SCALE for n in numbers):
        return None
    if len(numbers) == 2:
        return _in_range(numbers[0], numbers[1], form_point)
    return _in_range((numbers[0] + numbers[2]) / 2, (numbers[1] + numbers[3]) / 2, form_box)


def _from_json_value(value, depth: int = 0) -> PointResult | None:
    """The first point in a decoded JSON value: an object with a point/box key, or a list of them."""
    if depth > 4:
        return None
    if isinstance(value, dict):
        for key in _POINT_KEYS:
            if key in value:
                found = _from_numbers(value[key], "json_point", "json_bbox")
                if found is not None:
                    return found
        for key in _BOX_KEYS:
            if key in value and isinstance(value[key], (list, tuple)) and len(value[key]) == 4:
                found = _from_numbers(value[key], "json_bbox", "json_bbox")
                if found is not None:
                    return found
        if "x" in value and "y" in value:
            return _in_range(_number(value["x"]), _number(value["y"]), "json_point")
        return None
    if isinstance(value, list):
        for item in value[:16]:
            if isinstance(item, (dict, list)):
                found = _from_json_value(item, depth + 1)
                if found is not None:
                    return found
    return None


def _from_json(text: str) -> PointResult | None:
    """Decode JSON objects/arrays embedded anywhere in the text (fences, prose) and look inside."""
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[\{\[]", text)][:_MAX_JSON_STARTS]
    for start in starts:
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, (dict, list)):
            found = _from_json_value(value)
            if found is not None:
                return found
    return None


def _from_regex(pattern: re.Pattern, text: str, form: str) -> PointResult | None:
    for match in pattern.finditer(text):
        found = _in_range(_number(match.group(1)), _number(match.group(2)), form)
        if found is not None:
            return found
    return None


def _from_quads(pattern: re.Pattern, text: str, form: str) -> PointResult | None:
    for match in pattern.finditer(text):
        found = _from_numbers(match.groups(), form, form)
        if found is not None:
            return found
    return None


def parse_point(text: str) -> PointResult | None:
    """The click point in a model's answer, in 0..1000 relative coordinates, or None.

    Forms, tried in this order (the first one giving an in-range point wins):
    JSON objects with `point_2d` (or `point`, `coordinate`, ...) or `bbox_2d` (centre),
    also inside ```json fences and lists of objects; `<point>x y</point>`,
    `<point>[x, y]</point>`, `<point x="..." y="...">`; Qwen's `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`;
    `click(x=.., y=..)` / `click(x, y)`; a bare `[x1, y1, x2, y2]` (centre); a bare
    `(x, y)` / `[x, y]`. Coordinates outside 0..1000, non-strings and garbage give None;
    this function never raises.
    """
    if not isinstance(text, str) or not text:
        return None
    text = text[:MAX_PARSE_CHARS]
    try:
        return (_from_json(text)
                or _from_regex(_POINT_TAG, text, "tag")
                or _from_regex(_POINT_TAG_ATTRS, text, "tag")
                or _from_quads(_BOX_TAG, text, "box_tag")
                or _from_regex(_CLICK_KW, text, "click")
                or _from_regex(_CLICK_POS, text, "click")
                or _from_quads(_QUAD_IN_BRACKETS, text, "bbox")
                or _from_regex(_PAIR_IN_BRACKETS, text, "pair"))
    except (ValueError, OverflowError, RecursionError):
        return None


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
