"""Small ScreenSpot-format datasets built in the tests, with known answers, and the checks
the in-process and service tests share (assert_table, assert_predictions).

The rigged tiny checkpoint answers ANSWER, (642, 318) in 0..1000 coordinates, to every
prompt. On a W x H screenshot that is the pixel `point_to_pixels(ANSWER_XY, (W, H))`; each
sample's box is placed relative to that pixel on its own image so that the point is inside
("hit"), exactly on the box's edge ("edge", a hit: edges count), just outside ("near_miss")
or far away ("miss"). The screenshots have three different sizes, so a wrong mapping
(resized instead of original pixels, swapped axes) changes the accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelprune.points import point_to_pixels
from pixelprune.settings import PruneSettings

ANSWER = "(642, 318)"  # the rigged checkpoint's answer
ANSWER_XY = (642.0, 318.0)  # the same, as numbers
SETTINGS = ("full", "pred2d:max:0", "pred2d:max:0.02")
SIZES = ((400, 300), (260, 500), (352, 224))  # (W, H) of the screenshots; smart_resize changes each
HITS = {"hit": True, "edge": True, "near_miss": False, "miss": False}

# ScreenSpot: (file, data_type, data_source, kind); categories <split>/<data_type>
SCREENSPOT = {
    "screenspot_mobile_v2.json": [("text", "ios", "hit"), ("text", "android", "edge"), ("text", "ios", "miss"),
                                  ("icon", "android", "miss"), ("icon", "ios", "near_miss")],
    "screenspot_web_v2.json": [("text", "gitlab", "hit"), ("icon", "shop", "hit"), ("icon", "forum", "miss"),
                               ("icon", "tool", "edge"), ("icon", "shop", "hit")],
}
SCREENSPOT_EXPECTED = {"mobile/text": (2, 3), "mobile/icon": (0, 2), "web/text": (1, 1), "web/icon": (3, 4),
                       "all": (6, 10)}  # category -> (hits, samples)
# ScreenSpot-Pro: (file, group, ui_type, kind); categories <group>/<ui_type>
PRO = {
    "dev.json": [("Dev", "text", "hit"), ("Dev", "text", "miss"), ("Dev", "icon", "edge")],
    "cad.json": [("CAD", "text", "miss"), ("CAD", "text", "near_miss"), ("CAD", "text", "hit")],
}
PRO_EXPECTED = {"CAD/text": (1, 3), "Dev/icon": (1, 1), "Dev/text": (1, 2), "all": (3, 6)}


def screenshot(size: tuple[int, int], seed: int) -> np.ndarray:
    """A UI-like uint8 (H, W, 3) screenshot: flat background and bars, two noisy panels."""
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), (236, 238, 242), np.uint8)
    pixels[: height // 8] = (40, 60, 120)  # title bar
    left, right = width // 6, width // 2
    pixels[height // 3: height // 3 + 40, left:right] = rng.integers(0, 256, (40, right - left, 3))  # noisy panel
    pixels[-60:-20, -90:-10] = rng.integers(100, 140, (40, 80, 3))  # a low-contrast panel: tau > 0 drops it
    return pixels


def target(size: tuple[int, int]) -> tuple[float, float]:
    """Where the rigged answer lands on a (W, H) screenshot, in its pixels."""
    return point_to_pixels(ANSWER_XY, size)


def box_xyxy(size: tuple[int, int], kind: str) -> tuple[float, float, float, float]:
    """A target box (x1, y1, x2, y2) inside the image, placed against the rigged point."""
    x, y = target(size)
    if kind == "hit":
        return x - 12, y - 9, x + 12, y + 9
    if kind == "edge":  # the point is on the right edge
        return x - 20, y - 9, x, y + 9
    if kind == "near_miss":  # starts one pixel right of the point
        return x + 1, y - 9, x + 25, y + 9
    return 2.0, 2.0, 30.0, 20.0  # miss: the top-left corner


def edge_box_xywh(size: tuple[int, int], kind: str) -> list[float]:
    """ScreenSpot's [x, y, w, h] of a box. An "edge" box starts exactly at the point (x = px),
    since x + w would not give px back exactly in floating point."""
    x1, y1, x2, y2 = box_xyxy(size, kind)
    if kind == "edge":
        x, _ = target(size)
        return [x, y1, 20.0, y2 - y1]
    return [x1, y1, x2 - x1, y2 - y1]


def _save_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, size in enumerate(SIZES):
        name = f"shot_{size[0]}x{size[1]}.png"
        Image.fromarray(screenshot(size, seed=i)).save(folder / name)
        names.append(name)
    return names


def write_screenspot(root: Path) -> Path:
    """The ScreenSpot set: root/screenspot_*_v2.json, images in root/imgs/. Returns root."""
    names = _save_images(root / "imgs")
    index = 0
    for file, rows in SCREENSPOT.items():
        entries = []
        for data_type, source, kind in rows:
            size = SIZES[index % len(SIZES)]
            entries.append({"img_filename": f"imgs/{names[index % len(SIZES)]}", "bbox": edge_box_xywh(size, kind),
                            "instruction": f"target {index} ({kind})", "data_type": data_type, "data_source": source})
            index += 1
        (root / file).write_text(json.dumps(entries))
    return root


def write_pro(root: Path) -> tuple[Path, Path]:
    """The ScreenSpot-Pro set: root/annotations/*.json with ids, images in root/images/
    (so --images is needed). Returns (annotations folder, images folder)."""
    names = _save_images(root / "images")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    index = 0
    for file, rows in PRO.items():
        entries = []
        for group, ui_type, kind in rows:
            size = SIZES[index % len(SIZES)]
            entries.append({"img_filename": names[index % len(SIZES)], "bbox": list(box_xyxy(size, kind)),
                            "instruction": f"element {index} ({kind})", "ui_type": ui_type, "group": group,
                            "platform": "linux", "id": f"pro_{index}"})
            index += 1
        (root / "annotations" / file).write_text(json.dumps(entries))
    return root / "annotations", root / "images"


def expected_hits(annotations: Path, images: Path | None = None) -> dict[str, bool]:
    """sample id -> hit, from the kinds in the instructions (independent of the eval code)."""
    hits = {}
    for file in sorted(annotations.glob("*.json")):
        for index, entry in enumerate(json.loads(file.read_text())):
            kind = entry["instruction"].rsplit("(", 1)[1].rstrip(")")
            hits[entry.get("id", f"{file.stem}:{index}")] = HITS[kind]
    return hits


def markdown_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(category, setting) -> the cells of that table row in a --markdown file."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 9 and cells[0] not in ("category", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_table(markdown: str, expected: dict, settings=SETTINGS):
    """Every (category, setting) row has exactly the expected hits, samples and accuracy."""
    rows = markdown_rows(markdown)
    assert {c for c, _ in rows} == set(expected) and {s for _, s in rows} == set(settings)
    for category, (hits, samples) in expected.items():
        for setting in settings:
            cells = rows[(category, setting)]
            assert cells[:3] == [str(samples), str(hits), f"{100 * hits / samples:.1f} %"], (category, setting)
            assert cells[3] == "0"  # every answer had a point


def kept_and_total(image, setting: str) -> tuple[int, int]:
    """Blocks the model should see, computed here with the selector on the resized screenshot."""
    from pixelprune.selectors import select_blocks
    from pixelprune.stats import load_image

    settings = PruneSettings.parse(setting)
    _, pixels = load_image(image)
    keep = select_blocks(pixels, method=settings.method, metric=settings.metric, tau=settings.tau)
    return (keep.size if not settings.enabled else int(keep.sum())), keep.size


def assert_predictions(jsonl, annotations, images=None):
    """Each line: the rigged point mapped to its own screenshot, the expected hit, the right blocks."""
    from pixelprune.eval.data import load_dataset

    samples = {s.sample_id: s for s in load_dataset(annotations, images=images).samples}
    hits = expected_hits(annotations)
    lines = read_jsonl(jsonl)
    assert sorted((r["sample_id"], r["setting"]) for r in lines) == sorted(
        (i, s) for i in samples for s in SETTINGS)
    for r in lines:
        sample = samples[r["sample_id"]]
        kept, total = kept_and_total(sample.image, r["setting"])
        with Image.open(sample.image) as im:
            assert r["point"] == pytest.approx(list(target(im.size)), abs=1e-9)
        assert r["hit"] is hits[r["sample_id"]], r
        assert (r["kept_blocks"], r["total_blocks"], r["retain"]) == (kept, total, kept / total), r
        assert r["answer"] == ANSWER and r["random_weights"] is True
        assert r["ttft_ms"] > 0 and r["category"] == sample.category
        assert r["kv_bytes"] > 0  # in process from the engine, through a server from GroundResponse
        assert r["answer_logprob"] <= 0  # likewise: the answer tokens' summed log-probabilities (rigged: ~0)
    full = [r for r in lines if r["setting"] == "full"]
    assert all(r["retain"] == 1.0 for r in full)
    assert all(r["retain"] < 1.0 for r in lines if r["setting"] != "full")  # the screenshots have flat areas
