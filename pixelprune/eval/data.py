"""ScreenSpot-format annotation files -> evaluation samples.

Two formats, told apart by their fields (or forced with `fmt`):

    screenspot      ScreenSpot / ScreenSpot-v2: img_filename, bbox [x, y, w, h], instruction,
                    data_type ("text" / "icon"), data_source ("ios", "windows", "gitlab", ...)
    screenspot-pro  ScreenSpot-Pro: img_filename, bbox [x1, y1, x2, y2], instruction,
                    ui_type ("text" / "icon"), group ("Dev", "CAD", ...), platform

A sample's category is "<split>/<data_type>" for ScreenSpot, where the split is mobile,
desktop or web when the file's name says so (screenspot_mobile_v2.json) and the data
source otherwise, and "<group>/<ui_type>" for ScreenSpot-Pro: the columns of the
PixelPrune paper's Table 2. A sample's id is the entry's "id" when it has one, else
"<file stem>:<index in the file>". Images are found relative to the annotation file, or
under `images` when given.

Bad entries (missing fields, a box with no area) and files in no known format are
reported as `BadSample`s and the rest loads; whether a box lies inside its image is
checked when the image is opened (`check_box`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("screenspot", "screenspot-pro")
_FIELDS = {  # the category fields each format needs, beside img_filename, bbox and instruction
    "screenspot": ("data_type", "data_source"),
    "screenspot-pro": ("group", "ui_type"),  # `platform` and `application` are not needed
}
_SPLITS = ("mobile", "desktop", "web")  # ScreenSpot's splits, read from the file name


@dataclass(frozen=True)
class Sample:
    sample_id: str  # unique within a run; the key of the resumable JSONL
    image: Path  # the screenshot file
    instruction: str  # what to click
    box: tuple[float, float, float, float]  # target (x1, y1, x2, y2), pixels of the screenshot
    category: str  # "mobile/text", "Dev/icon", ...


@dataclass(frozen=True)
class BadSample:
    name: str  # the sample id (with its setting when only that answer failed), or the annotation file
    message: str  # one line: what is wrong
    what: str = "sample"  # "sample", or "file" when a whole annotation file is unusable

    def __str__(self) -> str:
        return f"{self.what} {self.name}: {self.message}"


@dataclass(frozen=True)
class Dataset:
    samples: tuple[Sample, ...]  # usable samples, in file order (files sorted by path)
    bad: tuple[BadSample, ...]  # entries and files that could not be read
    formats: dict  # annotation file (str) -> the format it was read as


def annotation_files(path: Path) -> list[Path]:
    """The JSON file given, or every *.json under a folder (sorted)."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.json") if p.is_file())
    if not files:
        raise ValueError(f"{path}: no annotation files (*.json) found")
    return files


def detect_format(entry: dict) -> str | None:
    """'screenspot-pro' for entries with ui_type/group, 'screenspot' for data_type/data_source."""
    if "ui_type" in entry or "group" in entry:
        return "screenspot-pro"
    if "data_type" in entry or "data_source" in entry:
        return "screenspot"
    return None


def _box(bbox, fmt: str) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) from a format's bbox; ValueError for anything else or a box with no area."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise ValueError(f"malformed bbox {bbox!r}: expected 4 numbers")
    a, b, c, d = (float(v) for v in bbox)
    if fmt == "screenspot":
        if c <= 0 or d <= 0:
            raise ValueError(f"malformed bbox {list(bbox)} ([x, y, w, h]): width and height must be > 0")
        return a, b, a + c, b + d
    if c <= a or d <= b:
        raise ValueError(f"malformed bbox {list(bbox)} ([x1, y1, x2, y2]): needs x2 > x1 and y2 > y1")
    return a, b, c, d


def check_box(sample: Sample, size: tuple[int, int]) -> None:
    """ValueError unless the sample's box lies inside its (W, H) screenshot."""
    x1, y1, x2, y2 = sample.box
    width, height = size
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ValueError(f"bbox (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is outside "
                         f"the {width}x{height} image")


def _category(entry: dict, fmt: str, file: Path) -> str:
    if fmt == "screenspot-pro":
        return f"{entry['group']}/{entry['ui_type']}"
    split = next((s for s in _SPLITS if s in file.stem.lower()), str(entry["data_source"]))
    return f"{split}/{entry['data_type']}"


def _sample(entry, index: int, file: Path, fmt: str, images: Path | None) -> Sample:
    """One entry as a Sample; ValueError (one line) when it is not one of `fmt`."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry is a {type(entry).__name__}, not an object")
    missing = [k for k in ("img_filename", "bbox", "instruction", *_FIELDS[fmt]) if k not in entry]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} for the {fmt} format")
    for key in ("img_filename", "instruction", *_FIELDS[fmt]):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise ValueError(f"{key} must be a non-empty string")
    box = _box(entry["bbox"], fmt)
    image = (images if images is not None else file.parent) / entry["img_filename"]
    return Sample(sample_id=_sample_id(entry, index, file), image=image, instruction=entry["instruction"],
                  box=box, category=_category(entry, fmt, file))


def _sample_id(entry, index: int, file: Path) -> str:
    given = entry.get("id") if isinstance(entry, dict) else None
    if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given).strip():
        return str(given).strip()
    return f"{file.stem}:{index}"


def _read_file(file: Path, fmt: str | None, images: Path | None, seen: set, samples: list, bad: list) -> str | None:
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        bad.append(BadSample(str(file), f"cannot read the annotation file ({exc})", "file"))
        return None
    first = next((e for e in entries if isinstance(e, dict)), None) if isinstance(entries, list) else None
    chosen = (fmt or detect_format(first)) if first is not None else None
    if chosen is None:
        bad.append(BadSample(str(file), f"unknown annotation format: expected a JSON list of ScreenSpot "
                                        f"or ScreenSpot-Pro entries (or give --format {'/'.join(FORMATS)})", "file"))
        return None
    for index, entry in enumerate(entries):
        try:
            sample = _sample(entry, index, file, chosen, images)
        except ValueError as exc:
            bad.append(BadSample(_sample_id(entry, index, file), str(exc)))
            continue
        if sample.sample_id in seen:
            bad.append(BadSample(sample.sample_id, f"duplicate sample id (entry {index} of {file})"))
            continue
        seen.add(sample.sample_id)
        samples.append(sample)
    return chosen


def load_dataset(path: str | Path, fmt: str | None = None, images: str | Path | None = None) -> Dataset:
    """Every sample of a JSON file or a folder of them. `fmt`: one of FORMATS (None = detect
    per file). `images`: the folder img_filename is relative to (None = the file's folder)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if images is not None and not Path(images).is_dir():
        raise ValueError(f"--images {images}: not a directory")
    samples: list[Sample] = []
    bad: list[BadSample] = []
    formats: dict[str, str] = {}
    seen: set[str] = set()
    for file in annotation_files(Path(path)):
        chosen = _read_file(file, fmt, None if images is None else Path(images), seen, samples, bad)
        if chosen is not None:
            formats[str(file)] = chosen
    return Dataset(samples=tuple(samples), bad=tuple(bad), formats=formats)


def in_categories(category: str, names: list[str]) -> bool:
    """True when `category` ("mobile/icon") is one of `names` or one of its parts is."""
    return any(name == category or name in category.split("/") for name in names)


def choose(samples, categories: list[str] | None = None, limit: int | None = None,
           seed: int | None = None) -> list[Sample]:
    """The samples in `categories` (all when None; see in_categories), shuffled by `seed`
    (file order when None), then the first `limit` of them (all when None)."""
    chosen = list(samples)
    if categories:
        unknown = [n for n in categories if not any(in_categories(s.category, [n]) for s in chosen)]
        if unknown:
            known = sorted({s.category for s in chosen})
            raise ValueError(f"no samples in categories {', '.join(unknown)}; the data has {', '.join(known)}")
        chosen = [s for s in chosen if in_categories(s.category, categories)]
    if seed is not None:
        random.Random(seed).shuffle(chosen)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        chosen = chosen[:limit]
    return chosen
