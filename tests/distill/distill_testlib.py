"""Small screenshots and annotation files for the `pixelprune distill` tests, and a helper
that runs the CLI in process. Imported by name (pytest puts this folder on sys.path)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

# (W, H) of the test screenshots: three grids (8x8, 10x8, 8x9 blocks), so batches mix sizes
SIZES = ((256, 256), (320, 256), (256, 288))
SHOTS = 6  # screenshots written by write_shots
INSTRUCTIONS = ("the search box", "the blue button", "the title bar")


def screenshot(size: tuple[int, int], seed: int) -> np.ndarray:
    """A UI-like uint8 (H, W, 3) screenshot: flat background, a title bar, a noisy panel and a
    button, placed by `seed` (so pruning keeps a different share of each)."""
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), (236, 238, 242), np.uint8)
    pixels[:32] = (40, 60, 120)
    top, left = 48 + 16 * (seed % 4), 16 + 24 * (seed % 3)
    pixels[top:top + 40, left:left + 120] = rng.integers(0, 256, (40, 120, 3))
    pixels[height - 56:height - 24, width - 96:width - 16] = (30, 110, 220)
    return pixels


def button_box(size: tuple[int, int]) -> list[int]:
    """The blue button's box [x, y, w, h] (ScreenSpot's bbox form)."""
    width, height = size
    return [width - 96, height - 56, 80, 32]


def write_shots(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(SHOTS):
        path = folder / f"shot{index}.png"
        Image.fromarray(screenshot(SIZES[index % len(SIZES)], index)).save(path)
        paths.append(path)
    return paths


def screenspot_rows(paths: list[Path], per_shot: int = 2) -> list[dict]:
    """ScreenSpot-v2 rows: `per_shot` instructions on each screenshot, the button's box."""
    rows = []
    for index, path in enumerate(paths):
        size = Image.open(path).size
        for k in range(per_shot):
            rows.append({"img_filename": path.name, "bbox": button_box(size), "data_type": "icon",
                         "data_source": "ios", "instruction": f"{INSTRUCTIONS[k % len(INSTRUCTIONS)]} {index}"})
    return rows


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def run_cli(argv: list[str]) -> int:
    from pixelprune.cli import main

    return main(["distill", *argv])
