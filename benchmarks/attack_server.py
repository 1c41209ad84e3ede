"""The harness of the attack benchmarks (benchmarks/attacks.py): `pixelprune serve` in a
subprocess with the tiny RANDOM-WEIGHT checkpoint, its RSS, and status codes by name."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc  # noqa: E402

SCREENSHOT = ROOT / "tests" / "data" / "corpus" / "desktop_pcmanfm_xterm_mousepad_1920x1080.png"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class PeakRss:
    """`with PeakRss(pid) as peak:` samples VmRSS every 20 ms; peak.mb is the highest seen."""

    def __init__(self, pid: int):
        self.pid, self.mb, self._done = pid, rss_mb(pid), threading.Event()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.mb = max(self.mb, rss_mb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> "PeakRss":
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()


class Server:
    """`pixelprune serve` in a subprocess; its log in a temp file."""

    def __init__(self, model: str, *flags: str):
        self.port, self.metrics_port, self.health_port = free_port(), free_port(), free_port()
        flags = ("--health-port", str(self.health_port), *flags)
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pixelprune.cli", "serve", "--model", model, "--host", "127.0.0.1", "--device",
             "cpu", "--port", str(self.port), "--metrics-port", str(self.metrics_port), *flags],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.channel = self.open_channel()
        deadline = time.monotonic() + 300
        while self.health(self.health_port) != SERVING:
            assert time.monotonic() < deadline and self.proc.poll() is None, "server did not start"
            time.sleep(0.2)

    def open_channel(self, port: int | None = None, options: tuple = ()) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{port or self.port}",
                                     options=[("grpc.max_send_message_length", 64 << 20), *options])

    def health(self, port: int):
        with self.open_channel(port) as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError as exc:
                return exc.code()

    def stub(self, channel: grpc.Channel | None = None):
        return pb_grpc.GroundingStub(channel or self.channel)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)


def status_name(status) -> str:
    """A health answer (a ServingStatus value) or a gRPC status code, by name."""
    return getattr(status, "name", None) or health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def code_of(fn) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def screenshot_rgb():
    """The corpus screenshot as an RGB PIL image (1920x1080)."""
    with Image.open(SCREENSHOT) as shot:
        return shot.convert("RGB")


def median(values) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
