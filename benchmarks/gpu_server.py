"""The server half of `python -m benchmarks.gpu`: a real gRPC server in this process
(service.server.create_server on 127.0.0.1, port 0) around the already loaded engine.

1. Ground per screenshot size, one caller, full vs pruned (`pruning.disabled`): client round
   trip and the server's TTFT, for the goal "a pruned Ground is faster than an unpruned one
   by at least their TTFT difference".
2. Concurrency: 1, 8, 32 ... callers, each on its own channel, each sending its requests one
   after the other (a closed loop), every request a distinct 1080p PNG (desktop and web page
   alternating, `gpu_setup.distinct`), server-default pruning, no session. Requests/s over
   the level's wall time, p50/p90 client latency, the server's queue wait, errors by status.
   A caller starts no new request after `level_seconds`; those in flight finish.

Also: the serve flags the benchmark passes on (`serve_options`, read by service/config.py),
the admission budgets sized for the callers (`budgets`), and the server's device metrics
(`server_counters`).

Every frame differs from every other in its bytes, so the vision cache never hits.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from benchmarks.gpu_setup import png
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc
from service.config import ServiceConfig

INSTRUCTION = "the Save button"
REQUEST_TIMEOUT_S = 300.0  # client deadline of one request; a stuck server fails the run, not hangs it
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def serve_options(flags: list[str], refused: tuple[str, ...] = ()) -> dict:
    """ServiceConfig fields set by `pixelprune serve` flags, read by service/config.py's own parser and
    checks (the environment is not read). ValueError for a flag naming a field in `refused` or a value
    the service refuses; an unknown flag ends the program with argparse's usage error (status 2)."""
    from service.config import add_arguments, from_namespace, option_default

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu (serve flags)", allow_abbrev=False,
                                     add_help=False)
    add_arguments(parser)
    namespace = parser.parse_args(flags)
    given = {name for name, value in vars(namespace).items() if value is not None}
    if bad := sorted(given & set(refused)):
        raise ValueError(f"--{bad[0].replace('_', '-')} is set by the benchmark, not by a serve flag")
    config = from_namespace(namespace, {})
    options = {name: option_default(name, config) for name in given - {"no_prune"}}
    if "no_prune" in given:
        options["prune_enabled"] = config.prune.enabled
    return options


def service_config(base: dict, options: dict) -> ServiceConfig:
    """A ServiceConfig of `base` (the benchmark's own options) and `options` (serve flags), by the flags' field
    names (service.config.configure), checked."""
    from service.config import configure, option_names

    if unknown := sorted((set(base) | set(options)) - option_names()):
        raise ValueError(f"ServiceConfig has no field(s) {unknown}")
    return configure(**base, **options).validate()


def budgets(callers: int, frame_pixels: list[int], single_pixels: list[int], max_image_pixels: int) -> dict:
    """--max-inflight-pixels and --queue-size for `callers` closed-loop callers at once: each holds at most
    one request, so the pixel budget takes `callers` of the largest concurrent frame (and at least the
    largest single screenshot and --max-image-pixels, which the service requires); the engine's waiting
    line takes twice `callers` (a margin: a place is held only until the engine admits the request)."""
    pixels = max(callers * max(frame_pixels), max(single_pixels, default=0), max_image_pixels)
    return {"max_inflight_pixels": pixels, "queue_size": 2 * callers}


def server_counters(registry) -> dict:
    """The server's own metrics of the device: CUDA graphs held, eager decode steps so far, KV pool positions."""
    def value(name: str) -> int | None:
        found = registry.get_sample_value(name)
        return None if found is None else int(found)

    return {"cuda_graphs": value("pixelprune_cuda_graphs"),
            "eager_steps_total": value("pixelprune_decode_eager_steps_total"),
            "kv_cache_capacity_tokens": value("pixelprune_kv_cache_capacity_tokens")}


def percentile(values, q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def encode_all(frames: list[np.ndarray], workers: int = 8) -> list[bytes]:
    """PNG bytes of each frame, encoded in parallel (Pillow releases the GIL while it compresses)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(png, frames))


def ground_request(data: bytes, disabled: bool | None = None) -> pb.GroundRequest:
    pruning = pb.PruningSettings(disabled=True) if disabled else None
    return pb.GroundRequest(image=pb.Image(encoded=data), instruction=INSTRUCTION, pruning=pruning)


def timed_ground(stub, request: pb.GroundRequest) -> tuple[float, pb.GroundResponse]:
    start = time.perf_counter()
    response = stub.Ground(request, timeout=REQUEST_TIMEOUT_S)
    return (time.perf_counter() - start) * 1000, response


def ground_by_size(port: int, frames: dict[str, list[tuple[bytes, bytes]]]) -> list[dict]:
    """Part 1. frames: label -> per run (full-request PNG, pruned-request PNG), all distinct.
    The first run of each size warms up and is not counted."""
    rows = []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GroundingStub(channel)
        for label, runs in frames.items():
            seen: dict[str, list] = {"full": [], "pruned": []}
            for i, (full_png, pruned_png) in enumerate(runs):
                for variant, data in (("full", full_png), ("pruned", pruned_png)):
                    latency, response = timed_ground(stub, ground_request(data, disabled=variant == "full"))
                    if i > 0:
                        seen[variant].append((latency, response))
            rows.append({"screenshot": label, **{variant: _ground_summary(pairs) for variant, pairs in seen.items()}})
    return rows


def _ground_summary(pairs: list[tuple[float, pb.GroundResponse]]) -> dict:
    responses = [r for _, r in pairs]
    return {
        "round_trip_ms": median([latency for latency, _ in pairs]),
        "server_ttft_ms": median([r.timings.ttft_ms for r in responses]),
        "server_total_ms": median([r.timings.total_ms for r in responses]),
        "kept_blocks": responses[0].kept_blocks, "total_blocks": responses[0].total_blocks,
        "kv_cache_bytes": responses[0].kv_cache_bytes, "random_weights": responses[0].random_weights,
        "runs": len(pairs),
    }


def _caller(port: int, frames: list[bytes], stop_at: float, out: dict) -> None:
    """One agent: its frames one after the other until they run out or `stop_at` passes."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GroundingStub(channel)
        for data in frames:
            if time.perf_counter() >= stop_at:
                return
            with out["lock"]:
                out["sent"] += 1
            try:
                latency, response = timed_ground(stub, ground_request(data))
            except grpc.RpcError as exc:
                with out["lock"]:
                    out["errors"][exc.code().name] += 1
                continue
            with out["lock"]:
                out["latency_ms"].append(latency)
                out["queue_ms"].append(response.timings.queue_ms)
                out["ttft_ms"].append(response.timings.ttft_ms)
                out["random_weights"].append(response.random_weights)


def concurrency_level(port: int, frames: list[list[bytes]], level_seconds: float) -> dict:
    """Part 2, one level: len(frames) callers, caller c sending frames[c]."""
    out = {"lock": threading.Lock(), "sent": 0, "errors": Counter(), "latency_ms": [], "queue_ms": [],
           "ttft_ms": [], "random_weights": []}
    start = time.perf_counter()
    threads = [threading.Thread(target=_caller, args=(port, own, start + level_seconds, out), daemon=True)
               for own in frames]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    answered = len(out["latency_ms"])
    return {
        "callers": len(frames), "planned": sum(len(own) for own in frames), "sent": out["sent"],
        "answered": answered, "errors": dict(out["errors"]),
        "elapsed_s": elapsed, "requests_per_s": answered / elapsed if elapsed > 0 else None,
        "p50_ms": percentile(out["latency_ms"], 50), "p90_ms": percentile(out["latency_ms"], 90),
        "server_queue_p50_ms": percentile(out["queue_ms"], 50), "server_ttft_p50_ms": percentile(out["ttft_ms"], 50),
        "random_weights": all(out["random_weights"]) if answered else None,
    }
