"""Selector speed and the decode-free "image -> kept-block pixel_values" path.

One CPU thread everywhere (thread env vars set before numpy is imported,
torch.set_num_threads(1)). Prints markdown tables:

1. median microseconds per block over the test corpus (tests/data/corpus) (each image cropped to
   whole blocks), per method / metric / tau, for: select_blocks as shipped
   (vectorised numpy at tau = 0, numba loop at tau > 0 when numba is installed),
   the plain-numpy fallback (numba disabled), and select_blocks_torch on CPU
   tensors; the authors' per-block loop times from reference/summary.json as a
   yardstick where they exist.
2. resize_to + select_blocks + kept_pixel_values vs transformers'
   Qwen2VLImageProcessorPil (Qwen3-VL settings) on the whole image, side by side
   (runs interleaved), medians over --runs runs, and the ratio; our rows are first
   checked equal to the processor's rows at the kept blocks. Inputs are decoded
   uint8 arrays. The corpus has no 3840x2160 screenshot: one is made by
   nearest-neighbour 2x upscaling of a 1920x1080 corpus screenshot.

Run: python benchmarks/selectors.py [--runs 7]
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib module `selectors` (which subprocess, hence
# torch, imports): drop its own directory from the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pixelprune import geometry, selectors  # noqa: E402
from pixelprune.geometry import kept_patch_rows, kept_pixel_values, resize_to, smart_resize  # noqa: E402
from pixelprune.selectors import METHODS, select_blocks  # noqa: E402
from pixelprune.model.selectors_torch import select_blocks_torch  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus"
SETTINGS = [("max", 0.0), ("max", 0.02), ("max", 0.05), ("mae", 0.02)]
AUTHOR_NAMES = {("pred2d", "max", 0.0): "pred_2d:exact:0.0", ("raster", "max", 0.0): "raster:exact:0.0",
                ("serpentine", "max", 0.0): "serpentine:exact:0.0", ("pred2d", "max", 0.02): "pred_2d:max:0.02",
                ("pred2d", "max", 0.05): "pred_2d:max:0.05", ("pred2d", "mae", 0.02): "pred_2d:mae:0.02"}


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load(name: str) -> np.ndarray:
    return np.asarray(Image.open(CORPUS / name).convert("RGB"))


def cropped_corpus() -> list[tuple[str, np.ndarray]]:
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    out = []
    for entry in manifest:
        image = load(entry["file"])
        out.append((entry["file"], np.ascontiguousarray(image[:image.shape[0] // 32 * 32,
                                                              :image.shape[1] // 32 * 32])))
    return out


def selector_table(images, runs: int) -> list[str]:
    summary = {e["file"]: e for e in json.loads((CORPUS / "reference" / "summary.json").read_text())}
    numba_on = selectors._numba_kernels()
    select_blocks(images[0][1][:64, :64], "pred2d", "max", 0.02)  # compile / load the kernels
    select_blocks(images[0][1][:64, :64], "raster", "max", 0.02)
    rows = ["| method | metric | tau | shipped (numba at tau>0) us/block | numpy only us/block "
            "| torch CPU us/block | authors' loop us/block |", "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for metric, tau in SETTINGS:
            per = {"shipped": [], "numpy": [], "torch": [], "authors": []}
            for name, pixels in images:
                blocks = pixels.shape[0] * pixels.shape[1] / 1024
                tensor = torch.from_numpy(pixels.copy())
                per["shipped"].append(median_seconds(lambda: select_blocks(pixels, method, metric, tau), runs))
                selectors._KERNELS.disabled = True
                per["numpy"].append(median_seconds(lambda: select_blocks(pixels, method, metric, tau), runs))
                selectors._KERNELS.disabled = False
                per["torch"].append(median_seconds(lambda: select_blocks_torch(tensor, method, metric, tau), runs))
                for key in ("shipped", "numpy", "torch"):
                    per[key][-1] *= 1e6 / blocks
                author = AUTHOR_NAMES.get((method, metric, tau))
                if author:
                    per["authors"].append(summary[name]["authors_selector_ms_1thread"][author] * 1e3 / blocks)
            cells = [f"{statistics.median(per[k]):.2f}" if per[k] else "-"
                     for k in ("shipped", "numpy", "torch", "authors")]
            rows.append(f"| {method} | {metric} | {tau} | " + " | ".join(cells) + " |")
    if not numba_on:
        rows.append("\n(numba is not installed: the 'shipped' column is the numpy fallback)")
    return rows


def pipeline_images() -> list[tuple[str, np.ndarray]]:
    images = [(name, load(name)) for name in ("web_django_models_2880x1800.png",
                                              "desktop_calc_pivot_terminal_2560x1440.png",
                                              "web_python_tutorial_classes_1920x1080.png",
                                              "desktop_pcmanfm_xterm_mousepad_1920x1080.png")]
    source = load("web_python_tutorial_classes_1920x1080.png")
    upscaled = np.ascontiguousarray(source.repeat(2, axis=0).repeat(2, axis=1))  # nearest-neighbour 2x
    return [("web_python_tutorial_classes 2x nearest -> 3840x2160", upscaled)] + images


def paired_medians(functions, runs: int) -> list[float]:
    """Median seconds of each function, runs interleaved so that load from other
    processes hits all of them alike."""
    times = [[] for _ in functions]
    for _ in range(runs):
        for fn, bucket in zip(functions, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def pipeline_table(runs: int) -> list[str]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                         size={"shortest_edge": 65536, "longest_edge": 16777216})
    rows = ["| image (W x H -> resized) | kept / blocks | resize ms | select ms | patchify ms "
            "| ours total ms | ours, PIL resize ms | HF processor ms | HF / ours | HF / ours with PIL resize |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, image in pipeline_images():
        height, width = smart_resize(*image.shape[:2])
        pixels = resize_to(image, height, width)
        keep = select_blocks(pixels)

        def ours():
            resized = resize_to(image, height, width)
            return kept_pixel_values(resized, select_blocks(resized))

        def ours_pil_resize():  # what a machine without numba runs (resize_to falls back to Pillow)
            kernels, geometry._kernels = geometry._kernels, lambda: None
            try:
                return ours()
            finally:
                geometry._kernels = kernels

        def theirs():
            return processor(images=image, return_tensors="np")

        np.testing.assert_array_equal(ours(), theirs()["pixel_values"][kept_patch_rows(keep)])
        t_resize, t_select, t_patch = paired_medians(
            [lambda: resize_to(image, height, width), lambda: select_blocks(pixels),
             lambda: kept_pixel_values(pixels, keep)], runs)
        t_ours, t_pil, t_hf = paired_medians([ours, ours_pil_resize, theirs], runs)
        size = f"{image.shape[1]}x{image.shape[0]} -> {width}x{height}"
        rows.append(f"| {name} ({size}) | {int(keep.sum())} / {keep.size} ({keep.mean():.1%}) | "
                    f"{t_resize * 1e3:.1f} | {t_select * 1e3:.1f} | {t_patch * 1e3:.1f} | {t_ours * 1e3:.1f} | "
                    f"{t_pil * 1e3:.1f} | {t_hf * 1e3:.1f} | {t_hf / t_ours:.1f}x | {t_hf / t_pil:.1f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = cropped_corpus()
    print(f"## Selector time, median over {len(images)} corpus images ({args.runs} runs each)\n")
    print("\n".join(selector_table(images, args.runs)))
    print(f"\n## Image -> kept-block pixel_values (pred2d, tau = 0), medians of {args.runs} runs\n")
    print("\n".join(pipeline_table(args.runs)))


if __name__ == "__main__":
    main()
