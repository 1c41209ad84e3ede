"""Attacks on a real `pixelprune serve`, with their numbers (BENCHMARKS.md, "Hostile input").

    python -m benchmarks.attacks [ATTACK ...] [--fuzz 10000] [--rounds 2] [--seconds 20]

Each attack starts its own server in a subprocess on 127.0.0.1 with the tiny
RANDOM-WEIGHT checkpoint (nothing is downloaded; the answers mean nothing) and
prints one JSON line. Here:

- bombs: idle RSS, then 16 concurrent 7000x7000 PNGs (RGB, then RGBA) and 16
  concurrent 641-byte JPEG bombs; peak RSS above idle (VmRSS sampled every 20 ms)
  and the status codes. Default flags, so the default --max-inflight-pixels.
- fuzz: N requests (random bytes, mutated messages, bad images, control tokens,
  emoji floods, bad pruning, malformed stream frames) from 8 threads; status
  codes, tracebacks in the server log, and the server's own count of them.
- tenants: two servers with different tokens on one Redis, 50 shared session
  ids; cache hits, changed fractions and overwrites across tenants; and one server
  with two tenants probing each other's screenshots (vision_cache_hit).
- drain: SIGTERM; how long a probe of the main port sees NOT_SERVING.
- prometheus: a fresh Prometheus scraping a fresh server every second; a burst of
  RESOURCE_EXHAUSTED, then what `increase()` reports.

and in benchmarks/attacks_input.py (scan_bomb, interrupt, unauth, png16) and
benchmarks/attacks_streams.py (give_up, unary_vs_streams, idle, send_blocked,
drain_streams), described there.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import attacks_input, attacks_streams  # noqa: E402
from benchmarks.attack_server import NOT_SERVING, SCREENSHOT, SERVING, PeakRss, Server, code_of, free_port  # noqa: E402
from pixelprune_api.grounding.v1 import grounding_pb2 as pb  # noqa: E402
from service_testlib import jpeg_bomb, png_bytes, raw_image, scrape  # noqa: E402


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
    idle = server.rss_mb()
    request = pb.GroundRequest(image=pb.Image(encoded=data), instruction="the terminal window")
    with PeakRss(server.proc.pid) as peak, ThreadPoolExecutor(count) as pool:
        codes = Counter(pool.map(lambda _: code_of(lambda: server.stub().Ground(request, timeout=600)),
                                 range(count)))
    return {"bytes": len(data), "idle_rss_mb": round(idle), "peak_above_idle_mb": round(peak.mb - idle),
            "codes": dict(codes)}


def bombs(model: str, args) -> dict:
    server = Server(model)
    try:
        first_idle = server.rss_mb()
        rgb, rgba = big_png(False), big_png(True)
        out = {f"round_{k}": {"rgb_7000x7000_png": attack_rss(server, rgb), "rgba_7000x7000_png": attack_rss(
            server, rgba), "jpeg_bomb_641_bytes": attack_rss(server, jpeg_bomb())} for k in range(args.rounds)}
        peaks = [r["idle_rss_mb"] + r["peak_above_idle_mb"] for rnd in out.values() for r in rnd.values()]
        out.update(first_idle_rss_mb=round(first_idle), max_rss_above_first_idle_mb=round(max(peaks) - first_idle),
                   idle_rss_after_mb=round(server.rss_mb()),
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


ATTACKS = {"bombs": bombs, "fuzz": fuzz, "tenants": tenants, "drain": drain, "prometheus": prometheus,
           **attacks_input.ATTACKS, **attacks_streams.ATTACKS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__.splitlines()[0])
    parser.add_argument("attacks", nargs="*", metavar="ATTACK", help=f"any of {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--fuzz", type=int, default=10_000, help="fuzzed requests")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three bomb attacks")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="duration of scan_bomb, give_up and unary_vs_streams, seconds")
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
