"""What the service exports on /metrics: sample names and their label names.

Preferred source: a live server (`service.server.create_server`) on loopback
ports with the tiny checkpoint, driven by real requests (a model run, a
frame-cache hit, a refused request) so every labelled series exists, then
scraped over HTTP. Before the service exists, the fixed contract in
INTERFACES.md (names, types, labels) stands in.
"""

from __future__ import annotations

import importlib
import importlib.util
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

# The contract: name -> (type, label names).
CONTRACT = {
    "pixelprune_request_duration_seconds": ("histogram", {"rpc", "code"}),
    "pixelprune_ttft_seconds": ("histogram", set()),
    "pixelprune_stage_duration_seconds": ("histogram", {"stage"}),
    "pixelprune_retain_ratio": ("histogram", set()),
    "pixelprune_visual_tokens": ("counter", {"kind"}),
    "pixelprune_kv_cache_bytes": ("histogram", set()),
    "pixelprune_kv_cache_in_use_bytes": ("gauge", set()),
    "pixelprune_queue_depth": ("gauge", set()),
    "pixelprune_queue_wait_seconds": ("histogram", set()),
    "pixelprune_frame_cache_queries": ("counter", set()),
    "pixelprune_frame_cache_hits": ("counter", set()),
    "pixelprune_changed_block_fraction": ("histogram", set()),
    "pixelprune_redis_errors": ("counter", set()),
    # streams per frame, admission
    "pixelprune_stream_frame_duration_seconds": ("histogram", {"code"}),
    "pixelprune_streams": ("counter", {"code"}),
    "pixelprune_stream_skipped_frames": ("counter", set()),
    "pixelprune_open_streams": ("gauge", set()),
    "pixelprune_inflight_pixels": ("gauge", set()),
    "pixelprune_inflight_pixels_limit": ("gauge", set()),
}
SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",),
            "summary": ("", "_count", "_sum")}


def sample_names(family: str, kind: str, labels: set[str]) -> dict[str, set[str]]:
    """Series names (with the type's suffixes) a family exposes -> their label names."""
    return {family + s: labels | ({"le"} if s == "_bucket" else set()) for s in SUFFIXES[kind]}


def from_contract() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for family, (kind, labels) in CONTRACT.items():
        names.update(sample_names(family, kind, labels))
    return names


def from_exposition(text: str) -> dict[str, set[str]]:
    """Series names -> label names, from Prometheus text format (families without samples too)."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("pixelprune_"):
            continue
        seen: dict[str, set[str]] = {}
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                seen.setdefault(sample.name, set()).update(sample.labels)
        for name, labels in sample_names(family.name, family.type, set()).items():
            names[name] = seen.get(name, labels)
    return names


def live_server_available() -> bool:
    return importlib.util.find_spec("service.server") is not None and hasattr(
        importlib.import_module("service.server"), "create_server")


def scrape_live_server(tiny_checkpoint: Path) -> str:
    """Start a real server, send real requests, return its /metrics text."""
    import grpc

    from pixelprune_api.grounding.v1 import grounding_pb2 as pb
    from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc
    from service.config import from_args_and_env
    from service.server import create_server

    config = from_args_and_env(["--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32",
                                "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--health-port", "0"], {})
    handle = create_server(config)
    try:
        ys, xs = np.mgrid[0:64, 0:96]
        rgb = np.stack([xs * 2, ys * 3, (xs + ys) % 256], axis=-1).astype(np.uint8)
        image = pb.Image(raw=pb.RawImage(width=96, height=64, rgb=rgb.tobytes()))
        request = pb.GroundRequest(image=image, instruction="click the blue square", session_id="k8s-metrics")
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = pb_grpc.GroundingStub(channel)
            stub.Ground(request, timeout=120)  # runs the model
            stub.Ground(request, timeout=120)  # same frame and instruction: answered from the session
            try:
                stub.Ground(pb.GroundRequest(image=image, instruction=""), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        url = f"http://127.0.0.1:{handle.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode()
    finally:
        handle.stop(0)
