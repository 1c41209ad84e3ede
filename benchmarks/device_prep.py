"""Preprocessing on the device vs on the CPU: screenshot -> keep mask + pixel_values on the model's device.

    python -m benchmarks.device_prep [--device auto] [--runs 7] [--threads 1] [--json FILE]

Per screenshot size of the GPU measurements (a 1920x1080 corpus web page upscaled 2x nearest-neighbour
for 3840x2160; corpus screenshots for the others: 1275x1650 resizes to 1280x1664), per
pruning setting, `prepare_image` through:
  * the CPU path (`on_device=False`): numba/Pillow resize, numpy/numba selection,
    numpy patchify, then `pixel_values` copied to the device;
  * the device path (`on_device=True`, `pixelprune.model.device_prep`): the decoded
    screenshot uploaded, resized, selected (tau = 0; tau > 0 downloads the resized image
    for the numba scan) and patchified on the device.
Both are first checked equal (keep mask and pixel_values, bit for bit). Runs interleaved,
medians; stage times are those `prepare_image` reports (the device path syncs at each stage).
A second table times the tau > 0 selection alone: `select_blocks_torch` on the device vs the
numba scan on a host copy (plus its download), the choice `prepare_on_device` makes.
Runs unchanged on CUDA (bf16 rows) and on CPU (fp32 rows, CPU tensors).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelprune.geometry import smart_resize
from pixelprune.model.device_prep import resize_torch
from pixelprune.model.pipeline import VisionSpec, prepare_image
from pixelprune.model.selectors_torch import select_blocks_torch
from pixelprune.selectors import select_blocks
from pixelprune.settings import PruneSettings

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus"
SPEC = VisionSpec(min_pixels=65536, max_pixels=16777216, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
SCREENS = [  # (label, corpus file, nearest-neighbour upscale factor)
    ("3840x2160 web page", "web_python_tutorial_classes_1920x1080.png", 2),
    ("2560x1440 web page", "web_sphinx_quickstart_2560x1440.png", 1),
    ("1920x1080 desktop", "desktop_pcmanfm_xterm_mousepad_1920x1080.png", 1),
    ("1280x1664 document page", "document_libtasn1_p11.png", 1),
    ("1170x2532 phone screen", "mobile_flask_quickstart_1170x2532.png", 1),
]
SETTINGS = ("pred2d:max:0", "pred2d:max:0.02")


def load(name: str, factor: int) -> np.ndarray:
    image = np.asarray(Image.open(CORPUS / name).convert("RGB"))
    return np.ascontiguousarray(image.repeat(factor, axis=0).repeat(factor, axis=1)) if factor > 1 else image


def synced(fn, device: torch.device):
    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run


def interleaved(functions, runs: int) -> list[tuple[float, list]]:
    """(median seconds, results) of each function, runs interleaved so load hits all alike."""
    times, results = [[] for _ in functions], [[] for _ in functions]
    for _ in range(runs):
        for fn, bucket, outs in zip(functions, times, results):
            start = time.perf_counter()
            outs.append(fn())
            bucket.append(time.perf_counter() - start)
    return [(statistics.median(t), r) for t, r in zip(times, results)]


def stage_medians(timings: list) -> dict[str, float]:
    """Median milliseconds of the preprocessing stages over runs (pixelprune.timings.Timings each)."""
    return {k: 1e3 * statistics.median(getattr(t, k) for t in timings) for k in ("upload", "resize", "select",
                                                                                  "patchify")}


def check_same(cpu, dev, label: str) -> None:
    if not (np.array_equal(cpu.keep, dev.keep) and torch.equal(cpu.pixel_values, dev.pixel_values)):
        raise SystemExit(f"device path differs from the CPU path on {label}")


def prep_rows(device: torch.device, dtype: torch.dtype, runs: int) -> list[dict]:
    rows = []
    for label, name, factor in SCREENS:
        image = load(name, factor)
        for text in SETTINGS:
            settings = PruneSettings.parse(text)
            cpu = synced(lambda: prepare_image(image, settings, SPEC, device, dtype, on_device=False), device)
            dev = synced(lambda: prepare_image(image, settings, SPEC, device, dtype, on_device=True), device)
            first = dev()
            check_same(cpu(), first, f"{label} {text}")  # also the warm-up
            (t_cpu, out_cpu), (t_dev, out_dev) = interleaved([lambda: cpu().timings, lambda: dev().timings], runs)
            rows.append({"screen": label, "input": f"{image.shape[1]}x{image.shape[0]}",
                         "resized": "x".join(map(str, first.resized_size)), "settings": text,
                         "kept": first.kept_blocks, "total": first.total_blocks,
                         "cpu_ms": 1e3 * t_cpu, "device_ms": 1e3 * t_dev,
                         "cpu_stages_ms": stage_medians(out_cpu), "device_stages_ms": stage_medians(out_dev)})
            del first
    return rows


def scan_rows(device: torch.device, runs: int, tau: float = 0.02) -> list[dict]:
    """tau > 0 selection alone: the torch wavefront on the device vs download + numba scan."""
    rows = []
    for label, name, factor in SCREENS:
        image = load(name, factor)
        height, width = smart_resize(*image.shape[:2])
        resized = resize_torch(torch.from_numpy(image.copy()).to(device), height, width)
        blocks = height * width // 1024
        on_device = synced(lambda: select_blocks_torch(resized, "pred2d", "max", tau), device)
        on_host = synced(lambda: select_blocks(resized.cpu().numpy(), "pred2d", "max", tau), device)
        if not np.array_equal(on_device().cpu().numpy(), on_host()):
            raise SystemExit(f"select_blocks_torch differs from select_blocks on {label}")
        (t_dev, _), (t_host, _) = interleaved([on_device, on_host], runs)
        rows.append({"screen": label, "blocks": blocks, "tau": tau, "device_ms": 1e3 * t_dev,
                     "host_ms": 1e3 * t_host, "device_us_per_block": 1e6 * t_dev / blocks,
                     "host_us_per_block": 1e6 * t_host / blocks})
    return rows


def stages(values: dict) -> str:
    return " / ".join(f"{values[k]:.1f}" for k in ("upload", "resize", "select", "patchify") if k in values)


def print_tables(device: torch.device, dtype: torch.dtype, prep: list[dict], scans: list[dict]) -> None:
    print(f"## Screenshot -> keep + pixel_values on {device} ({dtype}), medians\n")
    print("| screenshot (input -> resized) | settings | kept / total | CPU path ms | device path ms | speed-up "
          "| CPU resize / select / patchify+copy | device upload / resize / select / patchify |")
    print("|---|---|---|---|---|---|---|---|")
    for r in prep:
        print(f"| {r['screen']} ({r['input']} -> {r['resized']}) | {r['settings']} | {r['kept']} / {r['total']} | "
              f"{r['cpu_ms']:.1f} | {r['device_ms']:.1f} | {r['cpu_ms'] / r['device_ms']:.1f}x | "
              f"{stages(r['cpu_stages_ms'])} | {stages(r['device_stages_ms'])} |")
    print(f"\n## tau > 0 selection alone (pred2d, max, {scans[0]['tau']}), medians\n")
    print("| screenshot | blocks | select_blocks_torch on device ms (us/block) "
          "| download + numba scan ms (us/block) |")
    print("|---|---|---|---|")
    for r in scans:
        print(f"| {r['screen']} | {r['blocks']} | {r['device_ms']:.1f} ({r['device_us_per_block']:.2f}) | "
              f"{r['host_ms']:.1f} ({r['host_us_per_block']:.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda[:N]")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (numba kernels use one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    prep, scans = prep_rows(device, dtype, args.runs), scan_rows(device, max(3, args.runs // 2))
    print_tables(device, dtype, prep, scans)
    if args.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        args.json.write_text(json.dumps({"device": name, "dtype": str(dtype), "threads": args.threads,
                                         "prepare": prep, "tau_scan": scans}, indent=1))


if __name__ == "__main__":
    main()
