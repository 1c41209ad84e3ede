"""GPU benchmark of the grounding engine and service, on a Qwen3-VL with RANDOM WEIGHTS.

    python -m benchmarks.gpu [--json FILE] [--markdown FILE] [--runs 3] [--callers 1 8 32] ...
    python -m benchmarks.gpu --small --json out.json      # the reduced CPU run (CI)

Builds a checkpoint from Qwen3-VL-2B-Instruct's config with random weights (no download;
benchmarks/gpu_setup.py says where each value comes from), loads it through the service's
own loader (service.server.load_engine -> GroundingEngine.load), then:

1. Engine, per screenshot size of issue 10 (made from tests/data/corpus, see gpu_setup),
   full vs pruned, medians of --runs runs after one warm-up run: TTFT, ViT, LLM prefill,
   the preprocessing stages (resize / select / patchify, wherever they run), KV-cache bytes
   after prefill, decode ms per token, end to end (prepare + ground, CUDA-synchronised).
2. A real server in this process (create_server on 127.0.0.1, port 0) around that engine:
   Ground per size full vs pruned, then 1, 8, 32 concurrent callers with distinct 1080p
   screenshots: requests/s, p50/p90 latency (benchmarks/gpu_server.py).
3. The issue's goals next to the measured values.

Without CUDA (or with --small) it runs a reduced version on the CPU: the tiny checkpoint,
screenshots at a quarter of their size, 1 and 8 callers, few runs. Every table, the JSON and
the checkpoint's README say RANDOM WEIGHTS: the answers are meaningless, the times are real.
Engine and worker options of issue 10 (--max-batch-size, --no-cuda-graphs, ...) are passed
through `gpu_server.service_config` wherever this checkout's ServiceConfig has them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {  # --small / no CUDA, and the GPU run; explicit flags override either
    "gpu": {"size": "2b", "scale": 1.0, "runs": 3, "callers": [1, 8, 32], "requests": 4, "max_new_tokens": 24,
            "level_seconds": 60.0, "device": "auto", "threads": None},
    # One torch thread: on a shared CPU, OpenMP's spinning threads make a 2-thread run up to 25x slower.
    "small": {"size": "tiny", "scale": 0.25, "runs": 2, "callers": [1, 8], "requests": 4, "max_new_tokens": 8,
              "level_seconds": 20.0, "device": "cpu", "threads": 1},
}
# Issue 10's engine and worker options by ServiceConfig field name, used when no flag gives
# one; None = the service's own default. The integrator switches them on here, in one place.
OPTION_DEFAULTS = {"max_batch_size": None, "max_batch_tokens": None, "no_cuda_graphs": None,
                   "stop_after_point": None, "prefix_cache_bytes": None}


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="the reduced CPU run (automatic without CUDA)")
    p.add_argument("--size", choices=("tiny", "mid", "2b"), help="model size (2b; small: tiny)")
    p.add_argument("--device", help="torch device: auto, cuda, cuda:N, cpu (auto; small: cpu)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    p.add_argument("--runs", type=positive(int), help="timed runs per screenshot and variant (3; small: 2)")
    p.add_argument("--scale", type=positive(float), help="screenshot scale (1; small: 0.25)")
    p.add_argument("--callers", type=positive(int), nargs="+", help="concurrency levels (1 8 32; small: 1 8)")
    p.add_argument("--requests", type=positive(int), help="requests per caller per level (4)")
    p.add_argument("--level-seconds", type=positive(float), help="no new request after this (60; small: 20)")
    p.add_argument("--max-new-tokens", type=positive(int), help="answer length (24; small: 8)")
    p.add_argument("--threads", type=positive(int), help="torch CPU threads (torch's default; small: 1)")
    p.add_argument("--json", type=Path, help="write the results as JSON here (rewritten after each part)")
    p.add_argument("--markdown", type=Path, help="write the tables here too")
    p.add_argument("--workdir", type=Path, help="where the checkpoint is written (a temporary directory)")
    p.add_argument("--skip-server", action="store_true", help="engine part only")
    p.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved result and exit")
    # Issue 10's engine/worker options, by ServiceConfig field name; None = the service's default.
    p.add_argument("--max-batch-size", type=positive(int), help="sequences decoded together")
    p.add_argument("--max-batch-tokens", type=positive(int), help="KV-cache positions of the batch (rows x slot length)")
    p.add_argument("--no-cuda-graphs", action="store_const", const=True, help="eager decoding on CUDA")
    p.add_argument("--stop-after-point", action="store_const", const=True, help="end answers at a closed point")
    p.add_argument("--prefix-cache-bytes", type=int, help="device bytes of cached prompt prefixes")
    args = p.parse_args(argv)
    for path in (args.json, args.markdown, args.workdir and args.workdir / "x"):
        if path is not None and not path.parent.is_dir():
            p.error(f"no such directory: {path.parent}")
    if args.report is not None and not args.report.is_file():
        p.error(f"--report: no such file: {args.report}")
    return args


def resolve(args: argparse.Namespace, cuda: bool) -> dict:
    """The run's settings: the preset (small without CUDA), explicit flags over it."""
    small = args.small or not cuda
    settings = dict(PRESETS["small" if small else "gpu"], small=small, dtype=args.dtype)
    for name in PRESETS["gpu"]:
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    return settings


def engine_options(args: argparse.Namespace) -> dict:
    """OPTION_DEFAULTS with the flags given over them."""
    return {name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in OPTION_DEFAULTS.items()}


def measure(engine, pixels, settings, instruction: str) -> dict:
    """One prepare + ground: every stage time (ms), end to end, decode per token, sizes."""
    import torch

    def sync():
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)

    sync()
    start = time.perf_counter()
    prepared = engine.prepare(pixels, settings)
    out = engine.ground(prepared, instruction)
    sync()
    end_to_end = time.perf_counter() - start
    steps = out.generated_tokens - 1
    return {**{f"{stage}_ms": seconds * 1000 for stage, seconds in out.timings.items()},
            "end_to_end_ms": end_to_end * 1000,
            "decode_ms_per_token": out.timings["decode_tokens"] * 1000 / steps if steps > 0 else None,
            "generated_tokens": out.generated_tokens, "kept_blocks": out.kept_blocks,
            "total_blocks": out.total_blocks, "kv_cache_bytes": out.kv_cache_bytes,
            "resized": list(prepared.resized_size)}


def summarize(samples: list[dict]) -> dict:
    """Medians of the times over the runs; sizes and counts from the first run."""
    from benchmarks.gpu_server import median

    out = {}
    for key, first in samples[0].items():
        timed = key.endswith("_ms") or key == "decode_ms_per_token"
        out[key] = median([s[key] for s in samples]) if timed else first
    return out


def engine_part(engine, shots: dict, runs: int) -> list[dict]:
    from benchmarks.gpu_server import INSTRUCTION
    from pixelprune.settings import PruneSettings

    variants = (("full", PruneSettings(enabled=False)), ("pruned", PruneSettings()))
    rows = []
    for label, (pixels, how) in shots.items():
        samples: dict[str, list] = {"full": [], "pruned": []}
        for run in range(runs + 1):  # run 0 warms this shape up
            for variant, settings in variants:
                sample = measure(engine, pixels, settings, INSTRUCTION)
                if run:
                    samples[variant].append(sample)
        rows.append({"screenshot": label, "made_from": how, "size": [pixels.shape[1], pixels.shape[0]],
                     **{variant: summarize(values) for variant, values in samples.items()}})
        print(f"  engine: {label} done", file=sys.stderr)
    return rows


def server_part(engine, config, settings: dict, shots: dict, result: dict, save) -> None:
    from benchmarks import gpu_server
    from benchmarks.gpu_setup import DESKTOP_1080P, WEB_1080P, distinct, load_screenshot
    from service.server import create_server

    handle = create_server(config, engine=engine)
    counter = iter(range(1, 1 << 24))  # every frame sent is distinct
    try:
        frames = {}
        for label, (pixels, _) in shots.items():
            pngs = gpu_server.encode_all([distinct(pixels, next(counter)) for _ in range(2 * (settings["runs"] + 1))])
            frames[label] = list(zip(pngs[0::2], pngs[1::2]))
        result["ground"] = gpu_server.ground_by_size(handle.port, frames)
        save()
        bases = [load_screenshot(shot, settings["scale"])[0] for shot in (DESKTOP_1080P, WEB_1080P)]
        result["concurrency"] = []
        for callers in settings["callers"]:
            pngs = gpu_server.encode_all([distinct(bases[i % 2], next(counter))
                                          for i in range(callers * settings["requests"])])
            per_caller = [pngs[c::callers] for c in range(callers)]
            result["concurrency"].append(gpu_server.concurrency_level(handle.port, per_caller,
                                                                      settings["level_seconds"]))
            print(f"  server: level of {callers} caller(s) done", file=sys.stderr)
            save()
    finally:
        handle.stop(grace=0)


def describe(engine, settings: dict, options: tuple) -> dict:
    import torch
    import transformers

    from benchmarks.gpu_setup import MODEL_LABELS

    device = engine.device
    return {
        "random_weights": True,
        "model": {"size": settings["size"], "label": MODEL_LABELS[settings["size"]] + ", RANDOM WEIGHTS",
                  "parameters": sum(p.numel() for p in engine.model.parameters()),
                  "dtype": str(engine.dtype).removeprefix("torch."), "device": str(device),
                  "attn_implementation": getattr(engine.model.config, "_attn_implementation", None),
                  "max_new_tokens": settings["max_new_tokens"], "engine_says_random": engine.is_random_weights},
        "machine": {"accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)",
                    "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "settings": settings,
        "options": {"applied": options[0], "not_in_this_checkout": options[1]},
    }


def load(args: argparse.Namespace, workdir: Path):
    """(settings, service config, loaded engine, result header): the checkpoint written into
    `workdir` and loaded through the service's own loader."""
    import torch

    from benchmarks.gpu_server import service_config
    from benchmarks.gpu_setup import write_checkpoint
    from pixelprune.model.engine import resolve_device, resolve_dtype
    from service.server import load_engine

    settings = resolve(args, torch.cuda.is_available())
    if settings["small"] and not args.small:
        print("no CUDA: running the reduced CPU version (--small)", file=sys.stderr)
    if settings["threads"] is not None:
        torch.set_num_threads(settings["threads"])
    settings["threads"] = torch.get_num_threads()
    device = resolve_device(settings["device"])
    dtype = settings["dtype"] = str(resolve_dtype(settings["dtype"], device)).removeprefix("torch.")
    started = time.perf_counter()
    checkpoint = write_checkpoint(workdir / f"qwen3vl-{settings['size']}-random", settings["size"],
                                  device=str(device), dtype=dtype)
    base = {"model": str(checkpoint), "device": str(device), "dtype": dtype, "host": "127.0.0.1", "port": 0,
            "metrics_port": -1, "max_new_tokens": settings["max_new_tokens"],
            "queue_size": 2 * max(settings["callers"])}
    config, applied, missing = service_config(base, engine_options(args))
    engine = load_engine(config)
    if not engine.is_random_weights:
        raise RuntimeError(f"{checkpoint} was not recognised as a random-weight checkpoint")
    print(f"RANDOM WEIGHTS checkpoint ({settings['size']}) written and loaded in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return settings, config, engine, describe(engine, settings, (applied, missing))


def run(args: argparse.Namespace) -> int:
    from benchmarks import gpu_report
    from benchmarks.gpu_setup import SCREENSHOTS, load_screenshot

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        settings, config, engine, result = load(args, Path(tmp))
        shots = {shot.label: load_screenshot(shot, settings["scale"]) for shot in SCREENSHOTS}
        result["screenshots"] = [{"label": label, "made_from": how} for label, (_, how) in shots.items()]

        def save() -> None:
            result["goals"] = gpu_report.goals(result)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1) + "\n")

        engine.warmup()
        result["engine"] = engine_part(engine, shots, settings["runs"])
        save()
        if not args.skip_server:
            server_part(engine, config, settings, shots, result, save)
    text = gpu_report.markdown(result)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.report is not None:
            from benchmarks.gpu_report import markdown

            print(markdown(json.loads(args.report.read_text())))
            return 0
        return run(args)
    except ValueError as exc:  # a bad --device / --dtype / --report file, or a setting the service refuses
        print(f"python -m benchmarks.gpu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # e.g. gpu_run.sh's time limit: the JSON holds the parts finished
        print("python -m benchmarks.gpu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
