"""Model profiles: how each family of Qwen3-VL fine-tunes is asked for a click, and how its
answer becomes a pixel of the screenshot.

The strongest open grounding models of this size are Qwen3-VL fine-tunes with the same
architecture (dense `qwen3_vl` or MoE `qwen3_vl_moe`), so the adapter, pruning and the
batch serve them unchanged; what differs per family is data:

    system prompt (or none) -> user turn: the template, the instruction, where the image goes
    -> resize limits -> the answer's form (point, box centre, tool call, ...) -> its coordinate
    space (relative 0..1000, relative 0..999, pixels of the resized image) -> screenshot pixels

A `ModelProfile` holds that data and two pure functions: `prompt` (the user turn's text
around the image) and `point` (answer text -> pixel of the ORIGINAL screenshot). Each
profile names the source it was read from; what could not be checked against the family's
own material is in its `unverified` field. `resolve_profile("auto", model, hints)` picks the
profile from the checkpoint's name and card. Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pixelprune.points import DEFAULT_GROUNDING_PROMPT, INSTRUCTION_PLACEHOLDER, answer_text, parse_point

IMAGE_PLACEHOLDER = "{image}"  # where the screenshot goes in a user template (replaced by the image item)
AUTO = "auto"  # --profile value: choose from the checkpoint's name and card
DEFAULT_PROFILE = "qwen3-vl"  # auto's choice when no family is named
UserTurn = tuple[str, str]  # the user turn's text before and after the image


@dataclass(frozen=True)
class CoordinateSpace:
    name: str  # as the families' documentation calls it
    scale: float | None  # relative spaces: the coordinate of the right/bottom edge; None: resized pixels

    def bounds(self, resized_size: tuple[int, int]) -> tuple[float, float]:
        """Largest (x, y) a point may have in this space, for an image resized to (w, h)."""
        return (self.scale, self.scale) if self.scale is not None else (float(resized_size[0]), float(resized_size[1]))

    def normalize(self, x: float, y: float, resized_size: tuple[int, int]) -> tuple[float, float]:
        """The point in 0..1 of the image's width and height (clamped)."""
        bx, by = self.bounds(resized_size)
        return min(max(x / bx, 0.0), 1.0), min(max(y / by, 0.0), 1.0)


RELATIVE_1000 = CoordinateSpace("relative 0..1000", 1000.0)
RELATIVE_999 = CoordinateSpace("relative 0..999", 999.0)
RESIZED_PIXELS = CoordinateSpace("absolute pixels of the resized image", None)


def _whole(text: str) -> str:
    return text


def _between(opening: str, closing: str) -> Callable[[str], str]:
    """The text inside the last `opening`..`closing` pair (or after an unclosed `opening`); the whole
    text when the answer carries no such tag (a model that drops the wrapper still answers)."""
    def extract(text: str) -> str:
        if opening not in text:
            return text
        inside = text[text.rindex(opening) + len(opening):]
        return inside.split(closing, 1)[0]
    return extract


def _point_field(text: str) -> str:
    """GELab's `action:CLICK<TAB>point:x,y<TAB>...`: the `point:` field alone (other fields are prose)."""
    match = re.search(r"\bpoint\s*:[^\t\n]*", text)
    return match.group(0) if match else text


@dataclass(frozen=True)
class AnswerForm:
    name: str  # what the family answers, as its documentation shows it
    extract: Callable[[str], str]  # the part of the answer (reasoning already removed) that holds the point


POINT_JSON = AnswerForm('point: {"point_2d": [x, y]} (bbox_2d: its centre)', _whole)
TOOL_CALL = AnswerForm('tool call: <tool_call>{"name": "computer_use", "arguments": {"action": "left_click", '
                       '"coordinate": [x, y]}}</tool_call>', _between("<tool_call>", "</tool_call>"))
POINT_LIST = AnswerForm("point: [x,y] (a box [x1,y1,x2,y2]: its centre)", _whole)
ANSWER_TAG = AnswerForm('point after reasoning: <grounding_think>..</grounding_think><answer>{"coordinate": [x,y]}'
                        "</answer>", _between("<answer>", "</answer>"))
ACTION_FIELDS = AnswerForm("action fields after reasoning: <THINK>..</THINK> explain:..<TAB>action:CLICK<TAB>"
                           "point:x,y<TAB>summary:..", _point_field)
CLICK_JSON = AnswerForm('point: {"x": x, "y": y} (JSON schema in the prompt)', _whole)


@dataclass(frozen=True)
class ScreenPoint:
    pixels: tuple[float, float]  # in the ORIGINAL screenshot's pixels (continuous, clamped onto the image)
    normalized: tuple[float, float]  # 0..1 of the screenshot's width and height
    raw: tuple[float, float]  # as the model wrote it, in its profile's coordinate space
    form: str  # which parsed form matched (pixelprune.points.PointResult.form)


@dataclass(frozen=True)
class ModelProfile:
    name: str  # the --profile name
    family: str  # the model family
    models: tuple[str, ...]  # hub ids this profile serves (sizes; MoE ones are qwen3_vl_moe)
    source: str  # where the prompt and the coordinate convention were read
    system_prompt: str | None  # the system turn's text; None = no system turn
    user_template: str  # the user turn: {instruction} (replaced literally) and {image} once
    coordinates: CoordinateSpace  # the space the answer's numbers are in
    answer: AnswerForm  # the answer's form and where in the text its point is
    min_pixels: int | None = None  # smart_resize lower bound; None = the checkpoint's processor config
    max_pixels: int | None = None  # smart_resize upper bound; None = the checkpoint's processor config
    template_kwargs: tuple[tuple[str, object], ...] = ()  # chat-template variables, e.g. (("thinking", False),)
    answer_tokens: int = 24  # new tokens a whole answer of this form takes (reasoning included)
    trim_final_period: bool = False  # the family drops one trailing "." of the instruction
    match: tuple[str, ...] = ()  # lower-case fragments of a checkpoint's name or card naming this family
    unverified: str = ""  # what could not be checked against the family's own material

    def __post_init__(self):
        if self.user_template.count(IMAGE_PLACEHOLDER) != 1 or INSTRUCTION_PLACEHOLDER not in self.user_template:
            raise ValueError(f"profile {self.name}: the user template needs {IMAGE_PLACEHOLDER} once and "
                             f"{INSTRUCTION_PLACEHOLDER}")

    @property
    def chat_template_kwargs(self) -> dict:
        """Extra variables for the checkpoint's chat template (apply_chat_template(**kwargs))."""
        return dict(self.template_kwargs)

    def prompt(self, instruction: str, template: str | None = None) -> UserTurn:
        """The user turn's text before and after the image. `template` (None = the family's own)
        must hold {instruction}; without {image} the image goes where the family puts it (first,
        or after the text). Split at the image before the instruction goes in, so no instruction
        can add or move an image."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("instruction must be a non-empty string")
        template = self.user_template if template is None else template
        if not isinstance(template, str) or INSTRUCTION_PLACEHOLDER not in template:
            raise ValueError(f"prompt template must contain the placeholder {INSTRUCTION_PLACEHOLDER}")
        if IMAGE_PLACEHOLDER not in template:
            first = self.user_template.startswith(IMAGE_PLACEHOLDER)
            template = IMAGE_PLACEHOLDER + template if first else template + IMAGE_PLACEHOLDER
        if template.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"prompt template must contain {IMAGE_PLACEHOLDER} at most once")
        if self.trim_final_period and instruction.endswith("."):
            instruction = instruction[:-1]
        before, after = template.split(IMAGE_PLACEHOLDER)
        return before.replace(INSTRUCTION_PLACEHOLDER, instruction), after.replace(INSTRUCTION_PLACEHOLDER, instruction)

    def messages(self, turn: UserTurn | str, num_images: int = 1) -> list[dict]:
        """The chat for the processor's template: the system turn (if any), then the user turn with
        `num_images` image items at the image's place. A plain string is text after the images."""
        before, after = ("", turn) if isinstance(turn, str) else turn
        content = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}] * num_images
        content += [{"type": "text", "text": after}] if after else []
        chat = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            chat.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return chat

    def point(self, text: str, resized_size: tuple[int, int], original_size: tuple[int, int],
              partial: bool = False) -> ScreenPoint | None:
        """The click in the ORIGINAL screenshot's pixels, or None (no point in the family's space).

        Reasoning blocks are dropped (`points.answer_text`), the family's answer form isolates the
        point's text, `points.parse_point` reads it within the coordinate space's bounds; the point
        is then normalised (relative: / scale; resized pixels: / resized size, the model saw the
        resized image) and scaled to (W, H): x_px = nx * W, clamped into [0, W - 1]. `partial`:
        the answer is still being generated (a trailing number may grow)."""
        width, height = original_size
        if width <= 0 or height <= 0:
            raise ValueError(f"original_size must be positive (W, H), got {original_size!r}")
        found = parse_point(self.answer.extract(answer_text(text, partial)), self.coordinates.bounds(resized_size))
        if found is None:
            return None
        nx, ny = self.coordinates.normalize(found.x, found.y, resized_size)
        return ScreenPoint(pixels=(min(nx * width, width - 1.0), min(ny * height, height - 1.0)), normalized=(nx, ny),
                           raw=(found.x, found.y), form=found.form)


# ---------------------------------------------------------------------------------------- the families
# Qwen3-VL: relative 0..1000 coordinates ("Using relative position coordinates, it supports both boxes and
# points"), https://github.com/QwenLM/Qwen3-VL (README, cookbooks/2d_grounding.ipynb). The prompt is this
# project's (DEFAULT_GROUNDING_PROMPT); Qwen publishes no single grounding prompt. Image first, no system turn.
QWEN3_VL = ModelProfile(
    name="qwen3-vl", family="Qwen3-VL",
    models=("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct",
            "Qwen/Qwen3-VL-32B-Instruct", "Qwen/Qwen3-VL-30B-A3B-Instruct"),
    source="https://github.com/QwenLM/Qwen3-VL/blob/main/cookbooks/2d_grounding.ipynb",
    system_prompt=None, user_template=IMAGE_PLACEHOLDER + DEFAULT_GROUNDING_PROMPT, coordinates=RELATIVE_1000,
    answer=POINT_JSON,
    unverified="the 2d_grounding notebook itself (over 4 MB) was not read, only the README's description of its "
               "relative coordinates; Qwen's mobile_agent cookbook tells the model the screen is 999x999 "
               "(cookbooks/mobile_agent.ipynb) for agent tool calls, not for grounding.")

# GUI-Owl-1.5: the grounding evaluation's system prompt (computer_use tool, "The screen's resolution is
# 1000x1000", left_click / mouse_move only), image then the instruction, 196..9800 tokens of 32x32;
# https://github.com/X-PLUG/MobileAgent/blob/main/Mobile-Agent-v3.5/grounding_and_kb/eval_grounding_benchmarks.py
# ("GUI-Owl 1.5 outputs relative coordinates (0-1000) by default", Mobile-Agent-v3.5/README.md).
GUI_OWL_SYSTEM = (
    '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function '
    'signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", "function": {"name": "computer_use", '
    '"description": "Use a mouse to interact with a computer.\n* The screen\'s resolution is 1000x1000.\n* Make sure '
    "to click any buttons, links, icons, etc with the cursor tip in the center of the element. Don't click boxes on "
    "their edges unless asked.\n* don't use any other computer use tool like type, key, scroll, left_click_drag and "
    "so on.\n* you can only use the left_click and mouse_move action to interact with the computer. if you can't find "
    'the element, you should terminate the task and report the failure.", "parameters": {"properties": {"action": '
    '{"description": "The action to perform. The available actions are:\n* `mouse_move`: Move the cursor to a '
    "specified (x, y) pixel coordinate on the screen.\n* `left_click`: Click the left mouse button with coordinate "
    '(x, y) pixel coordinate on the screen.", "enum": ["mouse_move", "left_click"], "type": "string"}, "coordinate": '
    '{"description": "(x, y): The x (pixels from the left edge) and y (pixels from the top edge) coordinates to move '
    'the mouse to. Required only by `action=mouse_move` and `action=left_click`.", "type": "array"}}, "required": '
    '["action"], "type": "object"}}}\n</tools>\n\nFor each function call, return a json object with function name '
    'and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>\n")
GUI_OWL = ModelProfile(
    name="gui-owl", family="GUI-Owl-1.5 (Mobile-Agent-v3.5)",
    models=("mPLUG/GUI-Owl-1.5-2B-Instruct", "mPLUG/GUI-Owl-1.5-4B-Instruct", "mPLUG/GUI-Owl-1.5-8B-Instruct",
            "mPLUG/GUI-Owl-1.5-32B-Instruct"),
    source="https://github.com/X-PLUG/MobileAgent/blob/main/Mobile-Agent-v3.5/grounding_and_kb/"
           "eval_grounding_benchmarks.py",
    system_prompt=GUI_OWL_SYSTEM, user_template=IMAGE_PLACEHOLDER + INSTRUCTION_PLACEHOLDER,
    coordinates=RELATIVE_1000, answer=TOOL_CALL, min_pixels=196 * 32 * 32, max_pixels=9800 * 32 * 32,
    answer_tokens=64, match=("gui-owl", "gui_owl", "guiowl"),
    unverified="the evaluation reads the last (x, y) or [x, y] of the answer; the exact tool-call text the model "
               "writes is the system prompt's format, not a recorded answer; the Thinking variants' chat template "
               "was not read.")

# UI-Venus-1.5: no system turn, image then the prompt below, "[x,y]" in 0..1000 (the parser divides by 1000; a box
# gives its centre); a trailing "." of the instruction is dropped;
# https://github.com/inclusionAI/UI-Venus/blob/main/models/grounding/ui_venus1_5_gd.py (refusal wording on, as the
# ScreenSpot-Pro evaluation runs it: models/grounding/eval_screenspot_pro.py).
UI_VENUS = ModelProfile(
    name="ui-venus", family="UI-Venus-1.5",
    models=("inclusionAI/UI-Venus-1.5-2B", "inclusionAI/UI-Venus-1.5-8B", "inclusionAI/UI-Venus-1.5-30B-A3B"),
    source="https://github.com/inclusionAI/UI-Venus/blob/main/models/grounding/ui_venus1_5_gd.py",
    system_prompt=None,
    user_template=(IMAGE_PLACEHOLDER + "Output the center point of the position corresponding to the following "
                   "instruction: \n{instruction}. \n\nThe output should just be the coordinates of a point, in the "
                   "format [x,y]. Additionally, if the task is infeasible (e.g., the task is not related to the "
                   "image), the output should be [-1,-1]."),
    coordinates=RELATIVE_1000, answer=POINT_LIST, trim_final_period=True, match=("ui-venus", "ui_venus", "uivenus"),
    unverified="resize limits: the evaluation uses the checkpoint's processor config, as this profile does.")

# MAI-UI: the grounding system prompt, then the instruction + "\n" BEFORE the image; the answer reasons in
# <grounding_think> and gives {"coordinate": [x,y]} in <answer>; the evaluation that produced the published
# numbers divides by 1000 and resizes to at most 6,553,600 pixels;
# https://github.com/Tongyi-MAI/MAI-UI/blob/main/evaluation/grounding/eval_server.py.
MAI_UI_SYSTEM = (
    "You are a GUI grounding agent. \n## Task\nGiven a screenshot and the user's grounding instruction. Your task is "
    "to accurately locate a UI element based on the user's instructions.\nFirst, you should carefully examine the "
    "screenshot and analyze the user's instructions,  translate the user's instruction into a effective reasoning "
    "process, and then provide the final coordinate.\n## Output Format\nReturn a json object with a reasoning "
    "process in <grounding_think></grounding_think> tags, a [x,y] format coordinate within <answer></answer> XML "
    'tags:\n<grounding_think>...</grounding_think>\n<answer>\n{"coordinate": [x,y]}\n</answer>\n## Input '
    "instruction\n")
MAI_UI = ModelProfile(
    name="mai-ui", family="MAI-UI",
    models=("Tongyi-MAI/MAI-UI-2B", "Tongyi-MAI/MAI-UI-8B", "Tongyi-MAI/MAI-UI-32B"),
    source="https://github.com/Tongyi-MAI/MAI-UI/blob/main/evaluation/grounding/eval_server.py",
    system_prompt=MAI_UI_SYSTEM, user_template=INSTRUCTION_PLACEHOLDER + "\n" + IMAGE_PLACEHOLDER,
    coordinates=RELATIVE_1000, answer=ANSWER_TAG, max_pixels=6_553_600, answer_tokens=256,
    match=("mai-ui", "mai_ui", "maiui"),
    unverified="MAI-UI's agent code (src/mai_grounding_agent.py) divides by 999 and its system prompt there ends "
               "before '## Input instruction'; the evaluation's 1000 and prompt are used (at most 0.1 % of the "
               "width apart). The issue's 'box [x1, y1, x2, y2]' was not found in MAI-UI's code: it answers a point "
               "(a box would be read as its centre).")

# Step-GUI (GELab-Zero): no system turn; one user turn of text, the screenshot, text, in Chinese, from GELab's
# agent prompt with an empty history (the repository publishes no separate grounding prompt); coordinates
# 0..1000 ("取值范围均为 0-1000"; the executor divides by 1000); the answer: <THINK>..</THINK> then
# explain:..<TAB>action:CLICK<TAB>point:x,y<TAB>summary:..;
# https://github.com/stepfun-ai/gelab-zero/blob/main/copilot_tools/parser_0920_summary.py.
STEPGUI_TEMPLATE = (
    "你是一个手机 GUI-Agent 操作专家，你需要根据用户下发的任务、手机屏幕截图和交互操作的历史记录，借助既定的动作空间与手机进行交互，"
    "从而完成用户的任务。\n请牢记，手机屏幕坐标系以左上角为原点，x轴向右，y轴向下，取值范围均为 0-1000。\n\n在 Android 手机的场景下，"
    "你的动作空间包含以下9类操作，所有输出都必须遵守对应的参数要求：\n1. CLICK：点击手机屏幕坐标，需包含点击的坐标位置 point。\n"
    "例如：action:CLICK\tpoint:x,y\n2. TYPE：在手机输入框中输入文字，需包含输入内容 value、输入框的位置 point。\n"
    "例如：action:TYPE\tvalue:输入内容\tpoint:x,y\n3. COMPLETE：任务完成后向用户报告结果，需包含报告的内容 value。\n"
    "例如：action:COMPLETE\treturn:完成任务后向用户报告的内容\n4. WAIT：等待指定时长，需包含等待时间 value（秒）。\n"
    "例如：action:WAIT\tvalue:等待时间\n5. AWAKE：唤醒指定应用，需包含唤醒的应用名称 value。\n例如：action:AWAKE\tvalue:应用名称\n"
    "6. INFO：询问用户问题或详细信息，需包含提问内容 value。\n例如：action:INFO\tvalue:提问内容\n"
    "7. ABORT：终止当前任务，仅在当前任务无法继续执行时使用，需包含 value 说明原因。\n例如：action:ABORT\tvalue:终止任务的原因\n"
    "8. SLIDE：在手机屏幕上滑动，滑动的方向不限，需包含起点 point1 和终点 point2。\n"
    "例如：action:SLIDE\tpoint1:x1,y1\tpoint2:x2,y2\n9. LONGPRESS：长按手机屏幕坐标，需包含长按的坐标位置 point。\n"
    "例如：action:LONGPRESS\tpoint:x,y\n"
    "\n已知用户任务为：{instruction}\n已知已经执行过的历史动作如下：暂无历史操作\n当前手机屏幕截图如下：\n"
    + IMAGE_PLACEHOLDER +
    "\n在执行操作之前，请务必回顾你的历史操作记录和限定的动作空间，先进行思考和解释然后输出动作空间和对应的参数：\n"
    "1. 思考（THINK）：在 <THINK> 和 </THINK> 标签之间。\n2. 解释（explain）：在动作格式中，使用 explain: 开头，"
    "简要说明当前动作的目的和执行方式。\n在执行完操作后，请输出执行完当前步骤后的新历史总结。\n输出格式示例：\n"
    "<THINK> 思考的内容 </THINK>\nexplain:解释的内容\taction:动作空间和对应的参数\tsummary:执行完当前步骤后的新历史总结\n")
STEPGUI = ModelProfile(
    name="stepgui", family="Step-GUI (GELab-Zero)", models=("stepfun-ai/GELab-Zero-4B-preview",),
    source="https://github.com/stepfun-ai/gelab-zero/blob/main/copilot_tools/parser_0920_summary.py",
    system_prompt=None, user_template=STEPGUI_TEMPLATE, coordinates=RELATIVE_1000, answer=ACTION_FIELDS,
    answer_tokens=256, match=("step-gui", "stepgui", "step_gui", "gelab"),
    unverified="the Step-GUI report's grounding prompt is not published; the issue's '0..999, no system prompt' was "
               "not found: GELab's code states and uses 0..1000 (no system prompt is confirmed). Whether "
               "GELab-Zero-4B-preview is the report's Step-GUI-4B was not confirmed; the 8B is not released.")

# Holo2: no system turn, image then the localization prompt with ClickCoordinates' JSON schema (pydantic's
# model_json_schema() as Python prints it) and the task; {"x", "y"} in 0..1000; chat template with thinking
# off; https://github.com/hcompai/hai-cookbook/blob/main/holo2/holo_2_localization_huggingface.ipynb.
HOLO2_SCHEMA = ("{'properties': {'x': {'description': 'The x coordinate, normalized between 0 and 1000.', "
                "'maximum': 1000, 'minimum': 0, 'title': 'X', 'type': 'integer'}, 'y': {'description': 'The y "
                "coordinate, normalized between 0 and 1000.', 'maximum': 1000, 'minimum': 0, 'title': 'Y', "
                "'type': 'integer'}}, 'required': ['x', 'y'], 'title': 'ClickCoordinates', 'type': 'object'}")
HOLO2 = ModelProfile(
    name="holo2", family="Holo2 (H Company)",
    models=("Hcompany/Holo2-4B", "Hcompany/Holo2-8B", "Hcompany/Holo2-30B-A3B"),
    source="https://github.com/hcompai/hai-cookbook/blob/main/holo2/holo_2_localization_huggingface.ipynb",
    system_prompt=None,
    user_template=(IMAGE_PLACEHOLDER + "Localize an element on the GUI image according to the provided target and "
                   "output a click position.\n     * You must output a valid JSON following the format: "
                   + HOLO2_SCHEMA + "\n     Your target is:\n{instruction}"),
    coordinates=RELATIVE_1000, answer=CLICK_JSON, template_kwargs=(("thinking", False),),
    match=("holo2", "holo-2"),
    unverified="Holo2's chat template (what thinking=False writes after the assistant header) is the checkpoint's "
               "own and was not read; the cookbook resizes with LANCZOS, this service with the processor's bicubic.")

PROFILES: dict[str, ModelProfile] = {p.name: p for p in (QWEN3_VL, GUI_OWL, UI_VENUS, MAI_UI, STEPGUI, HOLO2)}


def get_profile(name: str) -> ModelProfile:
    """The profile of that name; ValueError (one line, naming the choices) otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected {AUTO} or one of {', '.join(PROFILES)}")
    return PROFILES[name]


def resolve_profile(requested: str, model: str, hints: Sequence[str] = ()) -> tuple[ModelProfile, str]:
    """(profile, why): the named one, or for "auto" the first family whose name fragment appears in the
    checkpoint's id or path, then in `hints` (its config and card, `checkpoint_hints`); qwen3-vl if none."""
    if requested != AUTO:
        return get_profile(requested), "asked for"
    for where, text in [("the checkpoint's name", model), *(("its config or card", h) for h in hints)]:
        lowered = str(text).lower()
        for profile in PROFILES.values():
            fragment = next((f for f in profile.match if f in lowered), None)
            if fragment is not None:
                return profile, f"auto: {fragment!r} in {where}"
    return PROFILES[DEFAULT_PROFILE], "auto: no other family named in the checkpoint's name, config or card"


def checkpoint_hints(model: str) -> list[str]:
    """What a local checkpoint says about its origin: config.json's `_name_or_path` and the model card's
    YAML header (base_model, tags). Empty for hub ids (their id names the family) and unreadable files."""
    folder, hints = Path(model), []
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        hints.append(str(config.get("_name_or_path", "")) if isinstance(config, dict) else "")
    except (OSError, ValueError):
        pass
    try:
        card = (folder / "README.md").read_text(encoding="utf-8", errors="replace")[:8192]
    except OSError:
        card = ""
    header = re.match(r"---\n(.*?)\n---", card, re.DOTALL)
    if header:
        hints.append(header.group(1))
    return [h for h in hints if h]
