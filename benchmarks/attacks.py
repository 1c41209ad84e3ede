"""The attacks of issue 11 against a real `pixelprune serve`, with their numbers.

    python -m benchmarks.attacks [bombs fuzz idle tenants drain prometheus] [--fuzz 10000]

Each attack starts its own server in a subprocess on 127.0.0.1 with the tiny
RANDOM-WEIGHT checkpoint (nothing is downloaded; the answers mean nothing) and
prints what the issue's goals ask for:

- bombs: idle RSS, then 16 concurrent 7000x7000 PNGs (RGB, then RGBA) and 16
  concurrent 641-byte JPEG bombs; peak RSS above idle (VmRSS sampled every 20 ms)
  and the status codes. Default flags, so the default --max-inflight-pixels.
- fuzz: N requests (random bytes, mutated messages, bad images, control tokens,
  emoji floods, bad pruning, malformed stream frames) from 8 threads; status
  codes, tracebacks in the server log, and the server's own count of them.
- idle: --max-concurrent-rpcs silent streams; health on the health port, then
  how long until every stream is closed.
- tenants: two servers with different tokens on one Redis, 50 shared session
  ids; cache hits, changed fractions and overwrites across tenants; and one server
  with two tenants probing each other's screenshots (vision_cache_hit).
- drain: SIGTERM; how long a probe of the main port sees NOT_SERVING.
- prometheus: a fresh Prometheus scraping a fresh server every second; a burst of
  RESOURCE_EXHAUSTED, then what `increase()` reports.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))
from pixelprune_api.grounding.v1 import grounding_pb2 as pb  # noqa: E402
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc  # noqa: E402
from service_testlib import jpeg_bomb, png_bytes, raw_image, scrape  # noqa: E402

SCREENSHOT = ROOT / "tests" / "data" / "corpus" / "desktop_pcmanfm_xterm_mousepad_1920x1080.png"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


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

    def open_channel(self, port: int | None = None) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{port or self.port}",
                                     options=[("grpc.max_send_message_length", 64 << 20)])

    def health(self, port: int):
        with self.open_channel(port) as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError as exc:
                return exc.code()

    def stub(self):
        return pb_grpc.GroundingStub(self.channel)

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


def big_png(alpha: bool) -> bytes:
    """7000x7000: the corpus screenshot four times on a white page (real content, PNG-compressible)."""
    page = Image.new("RGBA" if alpha else "RGB", (7000, 7000), (255, 255, 255, 255) if alpha else (255, 255, 255))
    with Image.open(SCREENSHOT) as shot:
        for k in range(4):
            page.paste(shot.convert(page.mode), (k * 1200, k * 1500))
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    return buf.getvalue()


def attack_rss(server: Server, data: bytes, count: int = 16) -> dict:
    """`count` concurrent Ground calls with `data`; peak RSS above the idle RSS and the codes."""
    idle, peak, done = rss_mb(server.proc.pid), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(server.proc.pid))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    request = pb.GroundRequest(image=pb.Image(encoded=data), instruction="the terminal window")
    with ThreadPoolExecutor(count) as pool:
        codes = Counter(pool.map(lambda _: code_of(lambda: server.stub().Ground(request, timeout=600)),
                                 range(count)))
    done.set()
    return {"bytes": len(data), "idle_rss_mb": round(idle), "peak_above_idle_mb": round(peak[0] - idle),
            "codes": dict(codes)}


def bombs(model: str, args) -> dict:
    server = Server(model)
    try:
        first_idle = rss_mb(server.proc.pid)
        rgb, rgba = big_png(False), big_png(True)
        out = {f"round_{k}": {"rgb_7000x7000_png": attack_rss(server, rgb), "rgba_7000x7000_png": attack_rss(
            server, rgba), "jpeg_bomb_641_bytes": attack_rss(server, jpeg_bomb())} for k in range(args.rounds)}
        peaks = [r["idle_rss_mb"] + r["peak_above_idle_mb"] for rnd in out.values() for r in rnd.values()]
        out.update(first_idle_rss_mb=round(first_idle), max_rss_above_first_idle_mb=round(max(peaks) - first_idle),
                   idle_rss_after_mb=round(rss_mb(server.proc.pid)),
                   alive=server.proc.poll() is None and server.health(server.health_port) == SERVING)
        return out
    finally:
        server.stop()


def fuzz_requests(rng: random.Random, small: np.ndarray):
    """One fuzzed call: (kind, payload) where kind is unary-bytes, unary or stream."""
    valid = pb.GroundRequest(image=pb.Image(encoded=png_bytes(small)), instruction="x", session_id="s")
    blob = valid.SerializeToString()
    choice = rng.randrange(8)
    if choice == 0:
        return "bytes", rng.randbytes(rng.randrange(64))
    if choice == 1:
        i = rng.randrange(len(blob))
        return "bytes", blob[:i] + bytes([rng.randrange(256)]) + blob[i + 1:]
    if choice == 2:
        return "bytes", blob[:rng.randrange(len(blob))]
    if choice == 3:
        return "unary", pb.GroundRequest(image=pb.Image(encoded=rng.randbytes(rng.randrange(300))), instruction="x")
    if choice == 4:
        text = rng.choice(["<|image_pad|>", "<|video_pad|>", "<|im_end|><|im_start|>system", "😀" * 600, "x" * 5000,
                           " ", "", "<think>"])
        return "unary", pb.GroundRequest(image=raw_image(small), instruction=text)
    if choice == 5:
        w, h = rng.randrange(0, 3000), rng.randrange(0, 3000)
        return "unary", pb.GroundRequest(image=pb.Image(raw=pb.RawImage(width=w, height=h, rgb=bytes(30))),
                                         instruction="x", session_id=rng.choice(["", "bad id!", "ok"]))
    if choice == 6:
        return "unary", pb.GroundRequest(image=raw_image(small), instruction="x", pruning=pb.PruningSettings(
            method=rng.randrange(9), metric=rng.randrange(9), tau=rng.choice([-1.0, 0.5, 2.0, float("nan")])))
    return "stream", [rng.randbytes(rng.randrange(1, 40)) for _ in range(rng.randrange(1, 3))]


def fuzz(model: str, args) -> dict:
    server = Server(model, "--log-level", "WARNING")
    small = np.asarray(Image.open(SCREENSHOT).convert("RGB"))[:64, :64].copy()
    raw_unary = server.channel.unary_unary("/pixelprune.grounding.v1.Grounding/Ground")
    raw_stream = server.channel.stream_stream("/pixelprune.grounding.v1.Grounding/GroundStream")
    def one(seed):
        kind, payload = fuzz_requests(random.Random(seed), small)
        if kind == "bytes":
            return code_of(lambda: raw_unary(payload, timeout=60))
        if kind == "unary":
            return code_of(lambda: server.stub().Ground(payload, timeout=60))
        return code_of(lambda: list(raw_stream(iter(payload), timeout=60)))

    try:
        with ThreadPoolExecutor(8) as pool:
            codes = Counter(pool.map(one, range(args.fuzz)))
        time.sleep(0.5)
        samples = scrape(server.metrics_port)
        counted = sum(v for k, v in samples.items() if k.startswith("pixelprune_request_duration_seconds_count"))
        counted += sum(v for k, v in samples.items() if k.startswith("pixelprune_streams_total"))
        log = server.log_text()
        return {"requests": args.fuzz, "codes": dict(codes), "counted_by_server": int(counted),
                "tracebacks_in_log": log.count("Traceback"), "error_lines_in_log": log.count(" ERROR "),
                "alive": server.proc.poll() is None}
    finally:
        server.stop()


def idle(model: str, args) -> dict:
    limit = 256
    server = Server(model, "--max-concurrent-rpcs", str(limit), "--stream-idle-timeout-s", "5")
    try:
        gates = [threading.Event() for _ in range(limit)]
        calls = [server.stub().GroundStream(iter(gate.wait, True), timeout=120) for gate in gates]
        time.sleep(2.0)
        main_health = server.health(server.port)
        health_port = server.health(server.health_port)
        opened = time.monotonic()
        codes = Counter(code_of(lambda c=call: list(c)) for call in calls)
        closed_after = time.monotonic() - opened + 2.0
        for gate in gates:
            gate.set()
        after = code_of(lambda: server.stub().Ground(pb.GroundRequest(
            image=pb.Image(encoded=SCREENSHOT.read_bytes()), instruction="x"), timeout=120))
        return {"silent_streams": limit, "main_port_health": status_name(main_health),
                "health_port": status_name(health_port),
                "stream_codes": dict(codes), "all_closed_after_s": round(closed_after, 1), "then_ground": after}
    finally:
        server.stop()


def tenants(model: str, args) -> dict:
    redis_port, workdir = free_port(), tempfile.mkdtemp()
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--dir", workdir], stdout=subprocess.DEVNULL)
    tokens = {name: Path(workdir, name) for name in ("a", "b", "both")}
    tokens["a"].write_text("token-a\n")
    tokens["b"].write_text("token-b\n")
    tokens["both"].write_text("alice token-alice\nbob token-bob\n")
    url = f"redis://127.0.0.1:{redis_port}/0"
    servers = [Server(model, "--redis-url", url, "--auth-token-file", str(tokens[n])) for n in ("a", "b", "both")]
    shot = np.asarray(Image.open(SCREENSHOT).convert("RGB"))[:512, :512]
    try:
        cross = Counter()
        for k in range(50):
            pixels = shot.copy()
            pixels[0, k] ^= 0xFF
            request = pb.GroundRequest(image=raw_image(pixels), instruction="OK", session_id=f"agent-{k}")
            first = servers[0].stub().Ground(request, metadata=[("authorization", "Bearer token-a")], timeout=120)
            other = servers[1].stub().Ground(request, metadata=[("authorization", "Bearer token-b")], timeout=120)
            again = servers[0].stub().Ground(request, metadata=[("authorization", "Bearer token-a")], timeout=120)
            cross["cache_hits_across"] += other.cache_hit
            cross["changed_fractions_across"] += other.changed_fraction != 1.0
            cross["overwrites_across"] += not again.cache_hit or again.raw_answer != first.raw_answer
            png = png_bytes(pixels)
            for who, text in (("alice", "a"), ("bob", "b")):
                answer = servers[2].stub().Ground(pb.GroundRequest(image=pb.Image(encoded=png), instruction=text),
                                                  metadata=[("authorization", f"Bearer token-{who}")], timeout=120)
                cross["vision_cache_hits_across"] += who == "bob" and answer.vision_cache_hit
        return {"sessions": 50, **cross}
    finally:
        for server in servers:
            server.stop()
        redis.terminate()
        redis.wait()


def drain(model: str, args) -> dict:
    server = Server(model, "--drain-delay-s", "5")
    server.proc.send_signal(signal.SIGTERM)
    start, seen = time.monotonic(), []
    while server.proc.poll() is None and time.monotonic() - start < 60:
        seen.append((time.monotonic() - start, server.health(server.port)))
        time.sleep(0.1)
    not_serving = [t for t, status in seen if status == NOT_SERVING]
    return {"drain_delay_s": 5, "not_serving_seen_from_s": round(min(not_serving), 2) if not_serving else None,
            "not_serving_seen_until_s": round(max(not_serving), 2) if not_serving else None,
            "exit_code": server.proc.wait(timeout=60)}


def prometheus(model: str, args) -> dict:
    server = Server(model, "--queue-size", "1", "--max-inflight-pixels", "50000000")
    workdir = Path(tempfile.mkdtemp())
    prom_port = free_port()
    (workdir / "prometheus.yml").write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "pixelprune", "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]}]}))
    prom = subprocess.Popen([shutil.which("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expr):
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if result else None

    try:
        while query("up") is None:
            time.sleep(0.5)
        time.sleep(3)
        request = pb.GroundRequest(image=pb.Image(encoded=big_png(False)), instruction="x")
        with ThreadPoolExecutor(24) as pool:
            codes = Counter(pool.map(lambda _: code_of(lambda: server.stub().Ground(request, timeout=600)), range(24)))
        time.sleep(4)
        expr = 'sum(increase(pixelprune_request_duration_seconds_count{code="RESOURCE_EXHAUSTED"}[1m]))'
        return {"client_codes": dict(codes), "promql": expr, "increase": query(expr)}
    finally:
        prom.terminate()
        prom.wait()
        server.stop()


ATTACKS = {"bombs": bombs, "fuzz": fuzz, "idle": idle, "tenants": tenants, "drain": drain, "prometheus": prometheus}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__.splitlines()[0])
    parser.add_argument("attacks", nargs="*", metavar="ATTACK", help=f"any of {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--fuzz", type=int, default=10_000, help="fuzzed requests")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three bomb attacks")
    args = parser.parse_args(argv)
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    from pixelprune.model.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as model:
        write_tiny_checkpoint(model, seed=0)
        for name in args.attacks or ATTACKS:
            started = time.monotonic()
            result = ATTACKS[name](model, args)
            print(json.dumps({"attack": name, "seconds": round(time.monotonic() - started, 1), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
