"""Training data for `pixelprune distill`: annotation files -> `DistillSample`s.

Four formats, told apart by the file and its first entry (or forced with `fmt`):

    screenspot      ScreenSpot / ScreenSpot-v2, read by `pixelprune.eval.data` exactly as `eval`
                    reads it: img_filename, bbox [x, y, w, h] in pixels, instruction, data_type, data_source
    screenspot-pro  ScreenSpot-Pro, also through `pixelprune.eval.data`: bbox [x1, y1, x2, y2] in pixels,
                    instruction, ui_type, group
    os-atlas        OS-Atlas grounding data: a JSON list of {"img_filename", "elements": [{"instruction",
                    "bbox": [left, top, right, bottom]}, ...]} (or flat {"img_filename", "instruction",
                    "bbox"} rows), bbox in fractions 0..1 of the image
    sharegpt        ShareGPT-style JSONL (or a JSON list): {"image" or "images": [path], "conversations":
                    [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}, or "messages" with
                    role/content; an optional leading system turn; one image, one exchange

Annotation formats (the first three) become the service's grounding prompt
(`pixelprune.points.grounding_prompt`) and, as the data's answer, the box centre in the
model's point format `{"point_2d": [x, y]}` (0..1000). ShareGPT rows keep their own user
text (an `<image>` tag in it is dropped: the image goes first, as the service sends it) and
their assistant text as the answer. Images are found relative to the annotation file, or
under `images` when given. Bad rows and unreadable files are returned as `BadRow`s (one
line each) and the rest loads. No torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from pixelprune.eval.data import load_dataset
from pixelprune.points import RELATIVE_SCALE, grounding_prompt

FORMATS = ("screenspot", "screenspot-pro", "os-atlas", "sharegpt")
IMAGE_TAG = "<image>"  # ShareGPT's placeholder for the image inside the user text
_HUMAN, _ASSISTANT, _SYSTEM = ("human", "user"), ("gpt", "assistant"), ("system",)


@dataclass(frozen=True)
class DistillSample:
    sample_id: str  # unique within a run: the entry's "id", else "<file stem>:<index>" ("...:<line>" for JSONL)
    image: Path  # the screenshot file
    prompt: str  # the user text the model is shown (after the image)
    answer: str | None = None  # the data's answer text; None: unlabelled (only `--labels teacher` can use it)
    box: tuple[float, float, float, float] | None = None  # target (x1, y1, x2, y2); None: no box (no click accuracy)
    box_relative: bool = False  # True: `box` is in fractions 0..1 of the image (OS-Atlas), else in pixels
    system: str | None = None  # a system turn before the user's (ShareGPT rows that carry one)
    category: str = ""  # "mobile/text", "Dev/icon", the OS-Atlas data_type, or "" (reports only)

    def messages(self) -> list[dict]:
        """The chat the model sees: [system], user (one image item, then the text)."""
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + [user]

    def relative_box(self, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The box in fractions 0..1 of a (W, H) screenshot, or None."""
        if self.box is None:
            return None
        if self.box_relative:
            return self.box
        width, height = size
        x1, y1, x2, y2 = self.box
        return x1 / width, y1 / height, x2 / width, y2 / height

    def data_answer(self, size: tuple[int, int]) -> str | None:
        """The answer to train on with `--labels data`: the given text, else the box centre as
        `{"point_2d": [x, y]}` in 0..1000 (Qwen3-VL's point format), else None."""
        if self.answer is not None:
            return self.answer
        box = self.relative_box(size)
        if box is None:
            return None
        x = round((box[0] + box[2]) / 2 * RELATIVE_SCALE)
        y = round((box[1] + box[3]) / 2 * RELATIVE_SCALE)
        return json.dumps({"point_2d": [x, y]})


@dataclass(frozen=True)
class BadRow:
    where: str  # "<file> entry 3", "<file> line 7", or the file itself
    message: str  # one line: what is wrong

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class DataSet:
    samples: tuple[DistillSample, ...]  # usable rows, in file order (files sorted within a folder)
    bad: tuple[BadRow, ...]  # rows and files that could not be read
    files: tuple[tuple[str, str], ...]  # (annotation file, the format it was read as)


def data_files(path: Path) -> list[Path]:
    """The file given, or every *.json / *.jsonl under a folder (sorted)."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    if not files:
        raise ValueError(f"{path}: no annotation files (*.json, *.jsonl) found")
    return files


def detect_format(first) -> str | None:
    """The format of a JSON file from its first entry, or None."""
    if not isinstance(first, dict):
        return None
    if "elements" in first:
        return "os-atlas"
    if "conversations" in first or "messages" in first:
        return "sharegpt"
    if "ui_type" in first or "group" in first:
        return "screenspot-pro"
    if "data_source" in first:
        return "screenspot"
    if "instruction" in first and "bbox" in first:
        return "os-atlas"
    return None


def _number_box(bbox, what: str) -> tuple[float, float, float, float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise ValueError(f"malformed bbox {bbox!r}: expected 4 numbers ({what})")
    return tuple(float(v) for v in bbox)


def _text(entry: dict, key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string")
    return value


def _atlas_sample(element, file: Path, image: Path, sample_id: str) -> DistillSample:
    if not isinstance(element, dict):
        raise ValueError(f"element is a {type(element).__name__}, not an object")
    x1, y1, x2, y2 = _number_box(element.get("bbox"), "[left, top, right, bottom] in fractions 0..1")
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise ValueError(f"bbox {[x1, y1, x2, y2]} is not [left, top, right, bottom] in fractions 0..1 "
                         "with right > left and bottom > top")
    category = element.get("data_type") if isinstance(element.get("data_type"), str) else ""
    return DistillSample(sample_id=sample_id, image=image, prompt=grounding_prompt(_text(element, "instruction")),
                         box=(x1, y1, x2, y2), box_relative=True, category=category)


def _read_atlas(entries: list, file: Path, images: Path | None, out: list, bad: list) -> None:
    for index, entry in enumerate(entries):
        where = f"{file} entry {index}"
        try:
            if not isinstance(entry, dict):
                raise ValueError(f"entry is a {type(entry).__name__}, not an object")
            image = (images or file.parent) / _text(entry, "img_filename")
            elements = entry["elements"] if "elements" in entry else [entry]
            if not isinstance(elements, list) or not elements:
                raise ValueError("elements must be a non-empty list")
        except ValueError as exc:
            bad.append(BadRow(where, str(exc)))
            continue
        for k, element in enumerate(elements):
            sample_id = f"{file.stem}:{index}" + (f".{k}" if "elements" in entry else "")
            try:
                out.append(_atlas_sample(element, file, image, sample_id))
            except ValueError as exc:
                bad.append(BadRow(f"{where} element {k}" if "elements" in entry else where, str(exc)))


def _turns(row: dict) -> list[tuple[str, str]]:
    """(role, text) of a ShareGPT row's turns, roles normalised to system / user / assistant."""
    key, role_key, text_key = (("conversations", "from", "value") if "conversations" in row
                               else ("messages", "role", "content"))
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{key} must be a non-empty list of turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise ValueError(f"each turn needs a {role_key!r} and a string {text_key!r}")
        role = str(turn.get(role_key, "")).lower()
        name = ("system" if role in _SYSTEM else "user" if role in _HUMAN else "assistant" if role in _ASSISTANT
                else None)
        if name is None:
            raise ValueError(f"unknown role {turn.get(role_key)!r}; expected human/user, gpt/assistant or system")
        out.append((name, turn[text_key]))
    return out


def _sharegpt_sample(row, file: Path, images: Path | None, sample_id: str) -> DistillSample:
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    paths = row.get("images", row.get("image"))
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or len(paths) != 1 or not isinstance(paths[0], str) or not paths[0].strip():
        raise ValueError("needs exactly one image path (\"image\": path or \"images\": [path])")
    turns = _turns(row)
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    roles = [role for role, _ in turns]
    if roles not in (["user"], ["user", "assistant"]):
        raise ValueError(f"expected one user turn and at most one assistant turn after it, got {roles}")
    prompt = turns[0][1].replace(IMAGE_TAG, "").strip()
    if not prompt:
        raise ValueError("the user turn has no text besides the image")
    answer = turns[1][1].strip() if len(turns) == 2 else None
    if answer == "":
        raise ValueError("the assistant turn is empty")
    return DistillSample(sample_id=sample_id, image=(images or file.parent) / paths[0], prompt=prompt,
                         answer=answer, system=system)


def _row_id(row, fallback: str) -> str:
    given = row.get("id") if isinstance(row, dict) else None
    if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given).strip():
        return str(given).strip()
    return fallback


def _read_sharegpt(rows: list, file: Path, images: Path | None, out: list, bad: list, lines: bool) -> None:
    for index, row in enumerate(rows):
        number = index + 1 if lines else index  # JSONL rows are named by line (from 1), JSON ones by index
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        try:
            out.append(_sharegpt_sample(row, file, images, _row_id(row, f"{file.stem}:{number}")))
        except ValueError as exc:
            bad.append(BadRow(f"{file} {'line' if lines else 'entry'} {number}", str(exc)))


def _jsonl_rows(file: Path, text: str) -> list:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            rows.append(BadRow(f"{file} line {number}", "empty line"))
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            rows.append(BadRow(f"{file} line {number}", f"not JSON ({exc})"))
    return rows


def _read_screenspot(file: Path, fmt: str, images: Path | None, out: list, bad: list) -> None:
    """Through `pixelprune.eval.data` (what `pixelprune eval` reads), one file at a time."""
    loaded = load_dataset(file, fmt, images)
    bad.extend(BadRow(f"{file} {item.what} {item.name}" if item.what == "sample" else str(file), item.message)
               for item in loaded.bad)
    out.extend(DistillSample(sample_id=s.sample_id, image=s.image, prompt=grounding_prompt(s.instruction),
                             box=s.box, category=s.category) for s in loaded.samples)


def read_file(file: Path, fmt: str | None, images: Path | None, out: list, bad: list) -> str | None:
    """Append the samples of one annotation file to `out` and its bad rows to `bad`; returns the
    format read, or None when the whole file is unusable (one BadRow)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        bad.append(BadRow(str(file), f"cannot read the file ({exc})"))
        return None
    if file.suffix == ".jsonl":
        if fmt not in (None, "sharegpt"):
            bad.append(BadRow(str(file), f"a .jsonl file is read as sharegpt, not {fmt}"))
            return None
        _read_sharegpt(_jsonl_rows(file, text), file, images, out, bad, lines=True)
        return "sharegpt"
    try:
        entries = json.loads(text)
    except ValueError as exc:
        bad.append(BadRow(str(file), f"not JSON ({exc})"))
        return None
    first = next((e for e in entries if isinstance(e, dict)), None) if isinstance(entries, list) else None
    chosen = fmt or detect_format(first)
    if not isinstance(entries, list) or chosen is None:
        bad.append(BadRow(str(file), f"unknown annotation format: expected a JSON list of {', '.join(FORMATS)} "
                                     "entries (or give --format)"))
        return None
    if chosen in ("screenspot", "screenspot-pro"):
        _read_screenspot(file, chosen, images, out, bad)
    elif chosen == "os-atlas":
        _read_atlas(entries, file, images, out, bad)
    else:
        _read_sharegpt(entries, file, images, out, bad, lines=False)
    return chosen


def read_data(paths, fmt: str | None = None, images: str | Path | None = None) -> DataSet:
    """Every sample of the given files and folders. `fmt`: one of FORMATS (None = detect per
    file). `images`: the folder image paths are relative to (None = each file's folder).
    Sample ids are made unique across files (a repeated id is prefixed with its file)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if images is not None and not Path(images).is_dir():
        raise ValueError(f"--images {images}: not a directory")
    images = None if images is None else Path(images)
    samples, bad, files, seen = [], [], [], set()
    for path in paths:
        for file in data_files(Path(path)):
            found: list[DistillSample] = []
            chosen = read_file(file, fmt, images, found, bad)
            if chosen is not None:
                files.append((str(file), chosen))
            for sample in found:
                if sample.sample_id in seen:
                    sample = replace(sample, sample_id=f"{file}#{sample.sample_id}")
                if sample.sample_id in seen:
                    bad.append(BadRow(f"{file} sample {sample.sample_id}", "duplicate sample id"))
                    continue
                seen.add(sample.sample_id)
                samples.append(sample)
    return DataSet(samples=tuple(samples), bad=tuple(bad), files=tuple(files))

