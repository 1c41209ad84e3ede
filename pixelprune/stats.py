"""Retain ratios of images and folders (`pixelprune stats`).

Each image goes through the same steps as the model's input: Qwen3-VL's
`smart_resize` and the processor's bicubic resize, then `select_blocks`. With
`resize=False` it is instead cropped from the top-left to whole 32x32 blocks,
which is how the authors' reference keep sets (shared corpus) were made.

The dataset-level retain ratio is the paper's: sum of kept blocks over sum of
blocks, so large images weigh more than small ones. Categories come from a
`manifest.json` (a list of {"file": ..., "category": ...}) in the image's
folder or a parent folder up to the folder given on the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm

from pixelprune.geometry import BLOCK_SIZE, resize_to, smart_resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ImageStats:
    path: str  # the image file
    category: str | None  # from a manifest.json, None when there is none
    original_size: tuple[int, int]  # (W, H) of the file
    size: tuple[int, int]  # (W, H) that was pruned: smart_resized, or cropped to whole blocks
    kept: int  # blocks kept by the selector
    total: int  # blocks in the (h/32) x (w/32) grid

    @property
    def retain_ratio(self) -> float:
        return self.kept / self.total


@dataclass(frozen=True)
class GroupStats:
    name: str  # category name, or "all"
    images: int  # images in the group
    kept: int  # sum of kept blocks
    total: int  # sum of blocks

    @property
    def retain_ratio(self) -> float:
        return self.kept / self.total  # the paper's dataset-level definition


@dataclass(frozen=True)
class StatsReport:
    method: str  # selector scan/predictor
    metric: str  # block distance
    tau: float  # tolerance; 0 = lossless
    resize: bool  # True: smart_resize + bicubic; False: crop to whole blocks
    images: tuple[ImageStats, ...]  # per image, in the order processed
    categories: tuple[GroupStats, ...]  # per manifest category, sorted by name
    overall: GroupStats  # every image

    def to_dict(self) -> dict:
        def group(g: GroupStats) -> dict:
            return {**asdict(g), "retain_ratio": g.retain_ratio}

        return {
            "settings": {"method": self.method, "metric": self.metric, "tau": self.tau, "resize": self.resize},
            "overall": group(self.overall),
            "categories": {g.name: group(g) for g in self.categories},
            "images": [{**asdict(s), "retain_ratio": s.retain_ratio} for s in self.images],
        }


def find_images(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """(image, root) pairs: files as given, folders searched recursively for
    png/jpg/jpeg/webp (sorted). root bounds the manifest search."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"{path}: no such file or directory")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"{path}: no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) found")
            pairs = [(p, path) for p in files]
        else:
            pairs = [(path, path.parent)]
        for image, root in pairs:
            if image.resolve() not in seen:
                seen.add(image.resolve())
                found.append((image, root))
    if not found:
        raise ValueError("no images given")
    return found


def _read_manifest(folder: Path, cache: dict[Path, dict[Path, str]]) -> dict[Path, str]:
    if folder not in cache:
        entries: dict[Path, str] = {}
        manifest = folder / MANIFEST
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
                for entry in data:
                    entries[(folder / entry["file"]).resolve()] = str(entry["category"])
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{manifest}: not a list of {{\"file\", \"category\"}} entries ({exc})") from None
        cache[folder] = entries
    return cache[folder]


def category_of(image: Path, root: Path, cache: dict) -> str | None:
    """The category a manifest.json in the image's folder or a parent (up to root) gives it."""
    target, root = image.resolve(), root.resolve()
    for folder in target.parents:
        category = _read_manifest(folder, cache).get(target)
        if category is not None:
            return category
        if folder == root:
            break
    return None


def load_image(path: str | Path, resize: bool = True) -> tuple[tuple[int, int], np.ndarray]:
    """((W, H) of the file, uint8 (h, w, 3) pixels ready for select_blocks):
    smart_resize + processor-style bicubic, or with resize=False the top-left
    crop to whole blocks. Transparency is composited on white, as the processor does."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file or directory" if not Path(path).exists() else f"{path}: not a file")
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
            width, height = size
            if resize:
                h, w = smart_resize(height, width)
                return size, resize_to(image, h, w)
            if width < BLOCK_SIZE or height < BLOCK_SIZE:
                raise ValueError(f"{width}x{height} is smaller than one {BLOCK_SIZE}x{BLOCK_SIZE} block "
                                 "(drop --no-resize)")
            pixels = resize_to(image, height, width)  # RGB conversion only
            return size, pixels[: height // BLOCK_SIZE * BLOCK_SIZE, : width // BLOCK_SIZE * BLOCK_SIZE]
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def compute_stats(paths: Iterable[str | Path], method: str = "pred2d", metric: str = "max", tau: float = 0.0,
                  resize: bool = True, progress: bool = False) -> StatsReport:
    """Kept and total blocks per image, per manifest category and overall."""
    from pixelprune.selectors import select_blocks, threshold_units

    threshold_units(method, metric, tau)  # bad settings fail before any image is read
    images = find_images(paths)
    cache: dict = {}
    results = []
    bar = tqdm(images, desc="pixelprune stats", unit="img", file=sys.stderr, leave=False,
               disable=not progress or len(images) < 2)
    for image, root in bar:
        original, pixels = load_image(image, resize)
        keep = select_blocks(pixels, method=method, metric=metric, tau=tau)
        results.append(ImageStats(path=str(image), category=category_of(image, root, cache), original_size=original,
                                  size=(pixels.shape[1], pixels.shape[0]), kept=int(keep.sum()), total=keep.size))
    names = sorted({r.category for r in results if r.category is not None})
    categories = tuple(_group(name, [r for r in results if r.category == name]) for name in names)
    return StatsReport(method=method, metric=metric, tau=float(tau), resize=resize, images=tuple(results),
                       categories=categories, overall=_group("all", results))


def _group(name: str, members: list[ImageStats]) -> GroupStats:
    return GroupStats(name=name, images=len(members), kept=sum(m.kept for m in members),
                      total=sum(m.total for m in members))


def add_selector_arguments(parser: argparse.ArgumentParser) -> None:
    """--method/--metric/--tau/--resize, shared with `pixelprune show`."""
    parser.add_argument("--method", default="pred2d", help="scan/predictor: raster, serpentine, pred2d (default)")
    parser.add_argument("--metric", default="max", help="block distance for tau > 0: max (default) or mae")
    parser.add_argument("--tau", type=float, default=0.0, help="tolerance on [0, 1] pixel values; 0 = lossless")
    parser.add_argument("--resize", action=argparse.BooleanOptionalAction, default=True,
                        help="smart_resize like Qwen3-VL (default); --no-resize crops to whole 32x32 blocks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="images and folders (searched recursively)")
    add_selector_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON with per-image results")
    parser.add_argument("--per-image", action="store_true", help="also list every image in the table")


def run(args: argparse.Namespace) -> int:
    report = compute_stats(args.paths, args.method, args.metric, args.tau, args.resize, progress=True)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    mode = "smart_resize" if report.resize else "cropped to whole blocks"
    print(f"method {report.method}, metric {report.metric}, tau {report.tau:g}, {mode}")
    rows = list(report.categories) + [report.overall]
    if args.per_image:
        rows = [GroupStats(Path(s.path).name, 1, s.kept, s.total) for s in report.images] + rows
    width = max(len(g.name) for g in rows) + 2
    print(f"{'':<{width}}{'images':>7}{'kept':>10}{'total':>10}{'retain':>9}")
    for g in rows:
        print(f"{g.name:<{width}}{g.images:>7}{g.kept:>10}{g.total:>10}{100 * g.retain_ratio:>8.1f}%")
    return 0
