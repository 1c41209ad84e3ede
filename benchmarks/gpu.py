"""GPU benchmark of the grounding engine and service, on a Qwen3-VL with RANDOM WEIGHTS.

    python -m benchmarks.gpu [--json FILE] [--markdown FILE] [--runs 3] [--callers 1 8 32] [SERVE FLAGS]
    python -m benchmarks.gpu --small --json out.json      # the reduced CPU run (CI)

Builds a checkpoint from Qwen3-VL-2B-Instruct's config with random weights (no download;
benchmarks/gpu_setup.py says where each value comes from), loads it through the service's
own loader (service.server.load_engine -> GroundingEngine.load), then:

1. Engine, per screenshot size (made from tests/data/corpus, see gpu_setup), full vs pruned,
   medians of --runs runs after one warm-up run: TTFT, ViT, LLM prefill, the preprocessing
   stages (resize / select / patchify, wherever they run), any other stage the engine
   reports, KV-cache bytes after prefill, decode ms per token, end to end (prepare + ground,
   CUDA-synchronised). The engine is stepped here (`engine.step`), so each step's StepStats
   give the CUDA graphs held and the decode steps that ran eagerly.
2. A real server in this process (create_server on 127.0.0.1, port 0) around that engine:
   Ground per size full vs pruned, then 1, 8, 32 concurrent callers, --requests each, with
   distinct 1080p screenshots: requests/s, p50/p90 latency, errors by status
   (benchmarks/gpu_server.py); after each part the server's own metrics
   (pixelprune_cuda_graphs, pixelprune_decode_eager_steps_total,
   pixelprune_kv_cache_capacity_tokens).
3. The goals next to the measured values; a goal is met only with 0 errors.

The pixel budget (--max-inflight-pixels) and the engine's waiting line (--queue-size) are
sized from the screenshots so that every caller of the largest level fits at once (none
waits for admission, none gets RESOURCE_EXHAUSTED): callers x the largest frame's pixels,
and 2 x callers places. Any other `pixelprune serve` flag (service/config.py, parsed by
its own parser, the environment not read) is passed to the server as given, e.g.
--max-batch-size, --max-batch-tokens (unset: the KV pool is sized from free CUDA memory
with --kv-cache-memory-fraction), --max-prefill-tokens, --admission-wait-s,
--stall-timeout-s, --no-cuda-graphs, --stop-after-point, --prefix-cache-bytes.

Without CUDA (or with --small) it runs a reduced version on the CPU: the tiny checkpoint,
screenshots at a quarter of their size, 1 and 8 callers, few runs. Every table, the JSON and
the checkpoint's README say RANDOM WEIGHTS: the answers are meaningless, the times are real.
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
    "gpu": {"size": "2b", "scale": 1.0, "runs": 3, "callers": [1, 8, 32], "requests": 16, "max_new_tokens": 24,
            "level_seconds": 45.0, "device": "auto", "threads": None},
    # One torch thread: on a shared CPU, OpenMP's spinning threads make a 2-thread run up to 25x slower.
    "small": {"size": "tiny", "scale": 0.25, "runs": 2, "callers": [1, 8], "requests": 4, "max_new_tokens": 8,
              "level_seconds": 20.0, "device": "cpu", "threads": 1},
}
# ServiceConfig fields the benchmark sets itself; a serve flag for one of them is refused.
OWN_FIELDS = ("model", "device", "dtype", "host", "port", "metrics_port", "health_port", "max_new_tokens")
SIZED_FIELDS = ("max_inflight_pixels", "queue_size")  # sized from the screenshots unless a serve flag gives them

SERVE_EPILOG = ("Any other flag is a `pixelprune serve` flag (see `pixelprune serve --help`), parsed and checked by "
                "service/config.py and passed to the server, e.g. --max-batch-size 32, --max-batch-tokens N "
                "(unset: sized from free CUDA memory), --kv-cache-memory-fraction, --max-prefill-tokens, "
                "--admission-wait-s, --stall-timeout-s, --no-cuda-graphs. --max-inflight-pixels and --queue-size are "
                "sized for the largest level of callers unless given. The environment (PIXELPRUNE_*) is not read.")


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0],
                                epilog=SERVE_EPILOG, allow_abbrev=False)
    p.add_argument("--small", action="store_true", help="the reduced CPU run (automatic without CUDA)")
    p.add_argument("--size", choices=("tiny", "mid", "2b"), help="model size (2b; small: tiny)")
    p.add_argument("--device", help="torch device: auto, cuda, cuda:N, cpu (auto; small: cpu)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    p.add_argument("--runs", type=positive(int), help="timed runs per screenshot and variant (3; small: 2)")
    p.add_argument("--scale", type=positive(float), help="screenshot scale (1; small: 0.25)")
    p.add_argument("--callers", type=positive(int), nargs="+", help="concurrency levels (1 8 32; small: 1 8)")
    p.add_argument("--requests", type=positive(int), help="requests per caller per level (16; small: 4)")
    p.add_argument("--level-seconds", type=positive(float), help="no new request after this (45; small: 20)")
    p.add_argument("--max-new-tokens", type=positive(int), help="answer length (24; small: 8)")
    p.add_argument("--threads", type=positive(int), help="torch CPU threads (torch's default; small: 1)")
    p.add_argument("--json", type=Path, help="write the results as JSON here (rewritten after each part)")
    p.add_argument("--markdown", type=Path, help="write the tables here too")
    p.add_argument("--workdir", type=Path, help="where the checkpoint is written (a temporary directory)")
    p.add_argument("--skip-server", action="store_true", help="engine part only")
    p.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved result and exit")
    args, args.serve_flags = p.parse_known_args(argv)
    for path in (args.json, args.markdown, args.workdir and args.workdir / "x"):
        if path is not None and not path.parent.is_dir():
            p.error(f"no such directory: {path.parent}")
    if args.report is not None and not args.report.is_file():
        p.error(f"--report: no such file: {args.report}")
    from benchmarks.gpu_server import serve_options

    try:
        args.serve = serve_options(args.serve_flags, refused=OWN_FIELDS)
    except ValueError as exc:
        p.error(str(exc))
    return args


def resolve(args: argparse.Namespace, cuda: bool) -> dict:
    """The run's settings: the preset (small without CUDA), explicit flags over it."""
    small = args.small or not cuda
    settings = dict(PRESETS["small" if small else "gpu"], small=small, dtype=args.dtype)
    for name in PRESETS["gpu"]:
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    return settings


def server_part(engine, config, settings: dict, shots: dict, result: dict, save) -> None:
    from prometheus_client import CollectorRegistry

    from benchmarks import gpu_server
    from benchmarks.gpu_setup import distinct
    from service.server import create_server

    registry = CollectorRegistry()
    handle = create_server(config, engine=engine, registry=registry)
    counter = iter(range(1, 1 << 24))  # every frame sent is distinct
    try:
        frames = {}
        for label, (pixels, _) in shots.items():
            pngs = gpu_server.encode_all([distinct(pixels, next(counter)) for _ in range(2 * (settings["runs"] + 1))])
            frames[label] = list(zip(pngs[0::2], pngs[1::2]))
        result["ground"] = gpu_server.ground_by_size(handle.port, frames)
        result["device"]["server"] = gpu_server.server_counters(registry)
        save()
        bases = concurrency_bases(settings["scale"])
        result["concurrency"] = []
        for callers in settings["callers"]:
            pngs = gpu_server.encode_all([distinct(bases[i % 2], next(counter))
                                          for i in range(callers * settings["requests"])])
            per_caller = [pngs[c::callers] for c in range(callers)]
            level = gpu_server.concurrency_level(handle.port, per_caller, settings["level_seconds"])
            result["concurrency"].append({**level, **gpu_server.server_counters(registry)})
            result["device"]["server"] = gpu_server.server_counters(registry)
            print(f"  server: level of {callers} caller(s) done", file=sys.stderr)
            save()
    finally:
        handle.stop(grace=0)


def concurrency_bases(scale: float) -> list:
    """The two 1080p screenshots the concurrent callers send (distinct copies of)."""
    from benchmarks.gpu_setup import DESKTOP_1080P, WEB_1080P, load_screenshot

    return [load_screenshot(shot, scale)[0] for shot in (DESKTOP_1080P, WEB_1080P)]


def describe(engine, settings: dict, serve: dict) -> dict:
    import torch
    import transformers

    from benchmarks import gpu_engine
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
        "serve": serve,
        "device": {"attention": gpu_engine.attention_kernels(engine)},
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
    base = {"model": "", "device": str(device), "dtype": dtype, "host": "127.0.0.1", "port": 0,
            "metrics_port": -1, "health_port": -1, "max_new_tokens": settings["max_new_tokens"]}
    started = time.perf_counter()
    base["model"] = str(write_checkpoint(workdir / f"qwen3vl-{settings['size']}-random", settings["size"],
                                         device=str(device), dtype=dtype))
    config = service_config(base, args.serve)
    engine = load_engine(config)
    if not engine.is_random_weights:
        raise RuntimeError(f"{base['model']} was not recognised as a random-weight checkpoint")
    print(f"RANDOM WEIGHTS checkpoint ({settings['size']}) written and loaded in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    serve = {"flags": args.serve_flags, "given": sorted(args.serve)}
    return settings, config, engine, describe(engine, settings, serve)


def size_budgets(config, settings: dict, shots: dict, result: dict):
    """The config with --max-inflight-pixels and --queue-size sized for the largest level (unless given)."""
    import dataclasses

    from benchmarks.gpu_server import budgets

    frames = [pixels.shape[0] * pixels.shape[1] for pixels in concurrency_bases(settings["scale"])]
    single = [pixels.shape[0] * pixels.shape[1] for pixels, _ in shots.values()]
    sized = {name: value for name, value in budgets(max(settings["callers"]), frames, single,
                                                     config.max_image_pixels).items()
             if name not in result["serve"]["given"]}
    config = dataclasses.replace(config, **sized).validate()
    result["serve"]["sized"] = sized
    from service.config import option_default

    result["serve"]["config"] = {name: option_default(name, config) for name in (
        "max_batch_size", "max_batch_tokens", "kv_cache_memory_fraction", "max_prefill_tokens", "no_cuda_graphs",
        "max_inflight_pixels", "queue_size", "admission_wait_s", "stall_timeout_s", "prefix_cache_bytes")}
    return config


def run(args: argparse.Namespace) -> int:
    from benchmarks import gpu_engine, gpu_report
    from benchmarks.gpu_setup import SCREENSHOTS, load_screenshot

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        settings, config, engine, result = load(args, Path(tmp))
        shots = {shot.label: load_screenshot(shot, settings["scale"]) for shot in SCREENSHOTS}
        result["screenshots"] = [{"label": label, "made_from": how} for label, (_, how) in shots.items()]
        config = size_budgets(config, settings, shots, result)

        def save() -> None:
            result["goals"] = gpu_report.goals(result)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1) + "\n")

        engine.warmup()
        result["device"]["kv_cache_capacity_tokens"] = engine.kv_capacity_tokens
        result["engine"] = gpu_engine.engine_part(engine, shots, settings["runs"])
        result["device"]["engine"] = {"cuda_graphs": max(row[v]["cuda_graphs"] for row in result["engine"]
                                                         for v in ("full", "pruned")),
                                      "eager_steps": sum(row[v]["eager_steps"] for row in result["engine"]
                                                         for v in ("full", "pruned"))}
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
