"""Service benchmark: what the gRPC service adds around the model, cache hits, and many streams.

    python benchmarks/service.py [--runs 10] [--hits 300] [--streams 16 64] [--duration 20]
                                 [--callers 1 8] [--requests 6] [--answer-tokens 24]

The server is `pixelprune serve` in a subprocess on loopback with the tiny
RANDOM-WEIGHT checkpoint (`pixelprune.model.tiny`: nothing is downloaded); the model
time is therefore small and meaningless, which is what makes the service's own
overhead visible. Printed as markdown:

1. Per-request overhead beyond the model for a 1080p PNG (the corpus desktop
   screenshot, no session, vision cache off so every request runs the model):
   client round trip minus the engine's own stages (resize, select, patchify,
   ViT, prefill, decode) as the server measured them in that very request; next
   to it, the same engine called directly in this process on the same pixels
   (interleaved run by run), and the server's PNG decode time.
2. Cache-hit latency: the same frame + instruction in one session, client round trip.
3. Streams: 16 and 64 concurrent GroundStreams for --duration seconds, each
   sending 640x480 raw frames at --fps where one frame in four changes one block
   (the other three repeat it: cache hits); answers/s, skipped frames, errors by
   status code, answer latency.
4. Throughput with batching: 1 and 8 concurrent unary callers, each sending --requests
   different 640x480 raw frames (no session, every frame new: no cache hits), answers
   of --answer-tokens tokens (random weights never stop early); requests/s, latency,
   and the model's mean batch size (from /metrics). The CPU goal: 8 callers
   >= 2x the requests/s of one.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path, where benchmarks/selectors.py would
# shadow the standard library's `selectors` (imported by socket and subprocess).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import io  # noqa: E402
import queue  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pixelprune_api.grounding.v1 import grounding_pb2 as pb  # noqa: E402
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc  # noqa: E402

SCREENSHOT = ROOT / "tests" / "data" / "corpus" / "desktop_pcmanfm_xterm_mousepad_1920x1080.png"
ENGINE_STAGES = ("resize_ms", "select_ms", "patchify_ms", "vit_ms", "prefill_ms", "decode_tokens_ms")


def pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pixelprune serve` in a subprocess on loopback; stopped with SIGTERM."""

    def __init__(self, model: str, *flags: str, metrics_port: int = -1):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pixelprune.cli", "serve", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--metrics-port", str(metrics_port), "--device", "cpu", "--log-level",
             "WARNING", *flags],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}",
                                             options=[("grpc.max_send_message_length", 64 << 20)])
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        raise RuntimeError("server did not become SERVING")

    def stub(self):
        return pb_grpc.GroundingStub(self.channel)

    def stop(self):
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def _variant_png(pixels: np.ndarray) -> bytes:
    """The screenshot with one pixel changed, as PNG: a frame that differs from the original in one block."""
    changed = pixels.copy()
    changed[500, 900] ^= 0xFF
    buf = io.BytesIO()
    Image.fromarray(changed).save(buf, format="PNG")
    return buf.getvalue()


def overhead(model: str, runs: int) -> dict:
    """Section 1: server round trip minus the engine's stages, and the engine alone, interleaved.

    Per run: one request without a session; one in a session whose frame alternates between the
    screenshot and a one-pixel variant (so it is compared and saved but never a cache hit); the
    engine alone on the same pixels."""
    from pixelprune.model.engine import GroundingEngine, ModelSpec, PruneSettings

    data = SCREENSHOT.read_bytes()
    pixels = np.asarray(Image.open(SCREENSHOT).convert("RGB"))
    frames = [data, _variant_png(pixels)]
    engine = GroundingEngine.load(ModelSpec(model=model, device="cpu", max_new_tokens=1))
    engine.warmup()
    server = Server(model, "--max-new-tokens", "1", "--vision-cache-size", "0", "--prefix-cache-bytes", "0")
    stub = server.stub()
    rows: dict[str, list[float]] = {}
    try:
        for i in range(runs + 1):
            for label, frame, session in (("", data, ""), ("session_", frames[i % 2], "bench")):
                start = time.perf_counter()
                response = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=frame), instruction="the terminal",
                                                        session_id=session))
                round_trip = (time.perf_counter() - start) * 1000
                assert not response.cache_hit
                in_server = sum(getattr(response.timings, name) for name in ENGINE_STAGES)
                if i > 0:  # the first run warms caches on both sides
                    for name, value in (("round_trip", round_trip), ("engine_in_server", in_server),
                                        ("overhead", round_trip - in_server), ("decode", response.timings.decode_ms),
                                        ("overhead_minus_decode", round_trip - in_server - response.timings.decode_ms)):
                        rows.setdefault(label + name, []).append(value)
            start = time.perf_counter()
            prepared = engine.prepare(pixels, PruneSettings())
            ground_start = time.perf_counter()
            output = engine.ground(prepared, "the terminal")
            end = time.perf_counter()
            if i > 0:
                rows.setdefault("engine_alone", []).append((end - start) * 1000)
                staged = output.timings.vit + output.timings.prefill + output.timings.decode_tokens
                rows.setdefault("engine_unstaged", []).append((end - ground_start - staged) * 1000)
    finally:
        server.stop()
    return rows


def cache_hits(model: str, count: int) -> list[float]:
    """Section 2: client round trips of identical frames in one session (all but the first are hits)."""
    server = Server(model, "--max-new-tokens", "1")
    stub = server.stub()
    request = pb.GroundRequest(image=pb.Image(encoded=SCREENSHOT.read_bytes()), instruction="the terminal",
                               session_id="bench")
    times = []
    try:
        stub.Ground(request)
        for _ in range(count):
            start = time.perf_counter()
            response = stub.Ground(request)
            times.append((time.perf_counter() - start) * 1000)
            assert response.cache_hit
    finally:
        server.stop()
    return times


def _stream_frames(base: np.ndarray, stream: int) -> list[bytes]:
    """Eight raw frames: one block changed (a new screen), three repeats, then it changes back."""
    changed = base.copy()
    changed[(stream % 15) * 32 + 3, (stream % 20) * 32 + 3] ^= 0xFF
    return [changed.tobytes()] * 4 + [base.tobytes()] * 4


def run_stream(stub, base, stream: int, duration: float, fps: float, out: dict) -> None:
    """One client stream: frames at `fps` for `duration` seconds; records answers and the final status."""
    h, w = base.shape[:2]
    lock = out["lock"]
    sent_at: dict[int, float] = {}
    outbox: queue.Queue = queue.Queue()

    def frames():
        sequence, end = 0, time.monotonic() + duration
        payloads = _stream_frames(base, stream)
        while time.monotonic() < end:
            sent_at[sequence] = time.perf_counter()
            yield pb.Frame(image=pb.Image(raw=pb.RawImage(width=w, height=h, rgb=payloads[sequence % 8])),
                           instruction="the OK button" if sequence == 0 else "", sequence=sequence)
            sequence += 1
            with lock:
                out["sent"] += 1
            time.sleep(1.0 / fps)

    try:
        for response in stub.GroundStream(frames(), timeout=duration + 120):
            outbox.put(((time.perf_counter() - sent_at[response.sequence]) * 1000, response.skipped_frames,
                        response.cache_hit))
        out["codes"].append("OK")
    except grpc.RpcError as exc:
        out["codes"].append(exc.code().name)
    with lock:
        out["per_stream"].append(outbox.qsize())  # answers this stream got (fairness across streams)
    while not outbox.empty():
        latency, skipped, hit = outbox.get()
        out["latency"].append(latency)
        out["skipped"].append(skipped)
        out["hits"].append(hit)


def streams(model: str, counts: list[int], duration: float, fps: float) -> list[dict]:
    """Section 3."""
    base = np.ascontiguousarray(np.asarray(Image.open(SCREENSHOT).convert("RGB"))[100:580, 0:640])
    results = []
    for count in counts:
        server = Server(model, "--max-new-tokens", "1")
        out = {"lock": threading.Lock(), "sent": 0, "codes": [], "latency": [], "skipped": [], "hits": [],
               "per_stream": []}
        stub = server.stub()
        threads = [threading.Thread(target=run_stream, args=(stub, base, k, duration, fps, out))
                   for k in range(count)]
        start = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        elapsed = time.perf_counter() - start
        server.stop()
        results.append({"streams": count, "elapsed": elapsed, **out})
    return results


def _distinct_frames(count: int) -> list[bytes]:
    """`count` different 640x480 raw frames: windows of the 1080p screenshot at shifted offsets."""
    pixels = np.asarray(Image.open(SCREENSHOT).convert("RGB"))
    return [np.ascontiguousarray(pixels[(37 * k) % 600:(37 * k) % 600 + 480, (53 * k) % 1280:(53 * k) % 1280 + 640])
            .tobytes() for k in range(count)]


def _mean_batch_size(metrics_port: int) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name.startswith("pixelprune_batch_size_")}
    return values["pixelprune_batch_size_sum"] / max(values["pixelprune_batch_size_count"], 1)


def throughput(model: str, callers: list[int], per_caller: int, answer_tokens: int) -> list[dict]:
    """Section 4: requests/s of N concurrent callers, each sending distinct frames one after another."""
    results = []
    for count in callers:
        metrics_port = free_port()
        server = Server(model, "--max-new-tokens", str(answer_tokens), "--queue-size", str(max(16, count)),
                        metrics_port=metrics_port)
        frames = _distinct_frames(count * per_caller + 1)
        stub = server.stub()
        stub.Ground(pb.GroundRequest(image=pb.Image(raw=pb.RawImage(width=640, height=480, rgb=frames[-1])),
                                     instruction="warm up"), timeout=300)
        latencies: list[float] = []
        lock = threading.Lock()

        def caller(k: int) -> None:
            for j in range(per_caller):
                frame = frames[k * per_caller + j]
                start = time.perf_counter()
                stub.Ground(pb.GroundRequest(image=pb.Image(raw=pb.RawImage(width=640, height=480, rgb=frame)),
                                             instruction=f"the button number {j}"), timeout=600)
                with lock:
                    latencies.append((time.perf_counter() - start) * 1000)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(count)]
        start = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        elapsed = time.perf_counter() - start
        results.append({"callers": count, "requests": len(latencies), "elapsed": elapsed, "latency": latencies,
                        "batch": _mean_batch_size(metrics_port)})
        server.stop()
    return results


def overhead_section(model: str, runs: int) -> None:
    rows = overhead(model, runs)
    print(f"\n### 1. Per-request overhead, 1080p PNG ({runs} runs, ms)\n")
    print("| quantity | no session p50 | p95 | in a session p50 | p95 |\n| --- | ---: | ---: | ---: | ---: |")
    for name, label in [("round_trip", "client round trip through the server"),
                        ("engine_in_server", "engine stages inside that request"),
                        ("overhead", "**overhead = round trip - engine stages**"),
                        ("decode", "of which PNG decode"),
                        ("overhead_minus_decode", "**overhead without PNG decode**")]:
        a, b = rows[name], rows["session_" + name]
        print(f"| {label} | {pct(a, 50):.1f} | {pct(a, 95):.1f} | {pct(b, 50):.1f} | {pct(b, 95):.1f} |")
    unstaged = rows["engine_unstaged"]
    print(f"| of the overhead: engine.ground outside its timed stages (tokenize, parse), engine alone | "
          f"{pct(unstaged, 50):.1f} | {pct(unstaged, 95):.1f} | | |")
    alone = rows["engine_alone"]
    print(f"| engine alone (prepare + ground), same pixels, this process | {pct(alone, 50):.1f} | "
          f"{pct(alone, 95):.1f} | | |")


def streams_section(model: str, counts: list[int], duration: float, fps: float) -> None:
    print(f"\n### 3. Concurrent streams, {duration:.0f} s each, {fps:g} fps per stream, 640x480 raw\n")
    print("| streams | frames sent | answers | answers/s | answers per stream min / max | cache hits | skipped | "
          "stream end codes | latency p50 ms | p95 ms |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in streams(model, counts, duration, fps):
        codes = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["codes"]).items()))
        print(f"| {r['streams']} | {r['sent']} | {len(r['latency'])} | {len(r['latency']) / r['elapsed']:.1f} | "
              f"{min(r['per_stream'])} / {max(r['per_stream'])} | {sum(r['hits'])} | {sum(r['skipped'])} | {codes} | {pct(r['latency'], 50):.0f} | "
              f"{pct(r['latency'], 95):.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: a fresh tiny random-weight one)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--hits", type=int, default=300)
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per stream test")
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second per stream")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 8], help="concurrent callers (section 4)")
    parser.add_argument("--requests", type=int, default=6, help="requests per caller (section 4)")
    parser.add_argument("--answer-tokens", type=int, default=24, help="tokens per answer (section 4)")
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 4], help="which sections to run")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from pixelprune.model.tiny import write_tiny_checkpoint
        model = str(write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", seed=0))

    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} ({os.cpu_count()} cores)")
    if 1 in args.sections:
        overhead_section(model, args.runs)
    if 2 in args.sections:
        hits = cache_hits(model, args.hits)
        print(f"\n### 2. Cache hit, same 1080p PNG + instruction in a session ({args.hits} requests, ms)\n")
        print(f"| p50 | p95 |\n| ---: | ---: |\n| {pct(hits, 50):.2f} | {pct(hits, 95):.2f} |")
    if 3 in args.sections:
        streams_section(model, args.streams, args.duration, args.fps)
    if 4 in args.sections:
        print(f"\n### 4. Throughput with batching: concurrent unary callers, {args.requests} different 640x480 raw "
              f"frames each, {args.answer_tokens}-token answers\n")
        print("| callers | requests | requests/s | latency p50 ms | p95 ms | mean batch size per decode step |\n"
              "| ---: | ---: | ---: | ---: | ---: | ---: |")
        results = throughput(model, args.callers, args.requests, args.answer_tokens)
        for r in results:
            print(f"| {r['callers']} | {r['requests']} | {r['requests'] / r['elapsed']:.2f} | "
                  f"{pct(r['latency'], 50):.0f} | {pct(r['latency'], 95):.0f} | {r['batch']:.2f} |")
        base = results[0]["requests"] / results[0]["elapsed"]
        for r in results[1:]:
            print(f"\n{r['callers']} callers / {results[0]['callers']}: "
                  f"{r['requests'] / r['elapsed'] / base:.2f}x the requests/s")
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
