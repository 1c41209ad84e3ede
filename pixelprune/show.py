"""Draw what PixelPrune keeps (`pixelprune show`, the paper's Figure 1).

Kept blocks are drawn as they are, pruned blocks are blended towards dark grey,
a thin grid marks the 32x32 block boundaries, and a label strip below the image
states the retain ratio, kept/total blocks and the selector settings: nothing of
the screenshot is covered (apps keep their menus in its corners). The image part
has the size the selector saw (after smart_resize, or the block-aligned crop),
at the top left of the picture, so the grid lines up with the visual tokens and
a point in model pixels is the same point in the picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pixelprune.geometry import BLOCK_SIZE, check_block_pixels
from pixelprune.stats import add_selector_arguments, load_image

DIM_COLOR = np.array([24, 24, 28], dtype=np.float32)  # pruned blocks fade towards this dark grey
DIM_STRENGTH = 0.72  # 0 = pruned blocks unchanged, 1 = solid DIM_COLOR
GRID_COLOR = np.array([120, 120, 130], dtype=np.float32)  # block boundary lines ...
GRID_STRENGTH = 0.45  # ... blended at this opacity, so text under them stays readable
LABEL_FILL = (16, 16, 20)  # the label strip below the image
TEXT_COLOR = (255, 255, 255, 255)
ACCENT_COLOR = (120, 220, 130, 255)  # the retain-ratio headline


def _check_keep(pixels: np.ndarray, keep) -> np.ndarray:
    check_block_pixels(pixels)
    keep = np.asarray(keep)
    grid = (pixels.shape[0] // BLOCK_SIZE, pixels.shape[1] // BLOCK_SIZE)
    if keep.dtype != np.bool_ or keep.shape != grid:
        raise ValueError(f"keep must be a bool array of shape {grid}, got {keep.dtype} {keep.shape}")
    return keep


def _blend_table(color: np.ndarray, strength: float) -> list[int]:
    """PIL `point` table (R, G, B: 3 x 256): value v blended towards color by `strength`."""
    values = np.arange(256, dtype=np.float32)[None, :]
    return np.rint(values + strength * (color[:, None] - values)).astype(np.uint8).reshape(-1).tolist()


DIM_TABLE = _blend_table(DIM_COLOR, DIM_STRENGTH)
GRID_TABLE = _blend_table(GRID_COLOR, GRID_STRENGTH)


def _draw_blocks(pixels: np.ndarray, keep: np.ndarray, grid: bool) -> Image.Image:
    """RGB image with pruned blocks dimmed and the block grid blended in
    (PIL lookup tables and masks: fast on a 4K screenshot)."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    kept = np.repeat(np.repeat(keep.astype(np.uint8) * 255, BLOCK_SIZE, axis=0), BLOCK_SIZE, axis=1)
    image = Image.composite(image, image.point(DIM_TABLE), Image.fromarray(kept))
    if grid:
        width = max(1, min(pixels.shape[:2]) // 1000)  # 1 px up to ~1080p, 2 px at 4K
        lines = np.zeros(pixels.shape[:2], dtype=np.uint8)
        for offset in range(width):
            lines[offset::BLOCK_SIZE] = 255
            lines[:, offset::BLOCK_SIZE] = 255
        image = Image.composite(image.point(GRID_TABLE), image, Image.fromarray(lines))
    return image


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit_fonts(lines: list[str], width: int, size: int) -> tuple[list, list[tuple[int, int, int, int]], int]:
    """(fonts, text boxes, size): the first line larger (a headline), shrunk until the widest
    line fits `width` with its padding (or the size reaches 8 px)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while True:
        fonts = [_font(round(size * 1.35))] + [_font(size)] * (len(lines) - 1)
        boxes = [draw.textbbox((0, 0), text, font=f) for text, f in zip(lines, fonts)]
        if max(b[2] - b[0] for b in boxes) + size <= width or size <= 8:
            return fonts, boxes, size
        size -= max(1, size // 8)


def _add_label(image: Image.Image, lines: list[str]) -> Image.Image:
    """`image` with a dark strip below it holding `lines`, scaled to the image: legible on a 4K
    screenshot (~60 px text), shrunk to fit a small one. The image itself is not touched."""
    width, height = image.size
    fonts, boxes, size = _fit_fonts(lines, width, max(12, round((width * height) ** 0.5 / 48)))
    pad, gap = size // 2, size // 3
    strip = sum(b[3] - b[1] for b in boxes) + gap * (len(lines) - 1) + 2 * pad
    picture = Image.new("RGB", (width, height + strip), LABEL_FILL)
    picture.paste(image, (0, 0))
    draw = ImageDraw.Draw(picture)
    y = height + pad
    for i, (text, font, box) in enumerate(zip(lines, fonts, boxes)):
        draw.text((pad - box[0], y - box[1]), text, font=font, fill=ACCENT_COLOR if i == 0 else TEXT_COLOR)
        y += box[3] - box[1] + gap
    return picture


def render_keep(pixels: np.ndarray, keep, caption: str | None = None, *, grid: bool = True,
                show_ratio: bool = True) -> Image.Image:
    """PIL RGB image of `pixels` (uint8 (H, W, 3), sides multiples of 32) with
    pruned blocks (keep False) dimmed and the block grid, and below it a label strip
    stating the retain ratio and kept/total blocks (show_ratio) and `caption` (e.g.
    the selector settings) on its own line. The picture is W wide and H + the strip
    high, the image at its top left; no strip (exactly W x H) when both are off."""
    keep = _check_keep(pixels, keep)
    image = _draw_blocks(pixels, keep, grid)
    lines = []
    if show_ratio:
        lines += [f"retain {100 * keep.mean():.1f} %", f"{int(keep.sum())} / {keep.size} blocks kept"]
    if caption:
        lines.append(caption)
    return _add_label(image, lines) if lines else image


def settings_caption(method: str, metric: str, tau: float, resize: bool) -> str:
    """One-line description of the selector settings for the label."""
    tau_text = "0 (lossless)" if tau == 0 else f"{tau:g} ({metric})"
    return f"{method}, tau {tau_text}, {'smart_resize' if resize else 'cropped'}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="screenshot or page (png, jpg, webp, ...)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.png", help="where to write the picture")
    add_selector_arguments(parser)
    parser.add_argument("--no-grid", dest="grid", action="store_false", help="do not draw block boundaries")


def run(args: argparse.Namespace) -> int:
    from pixelprune.selectors import select_blocks

    _, pixels = load_image(args.image, args.resize)
    keep = select_blocks(pixels, method=args.method, metric=args.metric, tau=args.tau)
    picture = render_keep(pixels, keep, settings_caption(args.method, args.metric, args.tau, args.resize),
                          grid=args.grid)
    out = Path(args.output)
    try:
        picture.save(out)
    except (OSError, ValueError) as exc:  # unknown extension, missing folder, read-only ...
        raise ValueError(f"{out}: cannot write the picture ({exc})") from None
    print(f"{out}: {picture.width}x{picture.height} (the {pixels.shape[1]}x{pixels.shape[0]} image the selector "
          f"saw, the label below it), kept {int(keep.sum())}/{keep.size} blocks ({100 * keep.mean():.1f} %)")
    return 0
