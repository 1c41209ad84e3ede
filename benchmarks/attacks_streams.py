"""Attacks with streams. Run by `python -m benchmarks.attacks`; default flags unless named.

- give_up: 64 streams send the corpus screenshot (8 variants) at 4 fps; 16 of them are
  cancelled by their clients halfway, the rest end; then, with no stream open, 10 Ground
  calls and one new stream on the idle server.
- unary_vs_streams: 64 streams at 2 fps and 16 polite Ground callers (full-size screenshot;
  0.2 s pause after RESOURCE_EXHAUSTED); the callers' answers and calls.
- idle: 256 streams that never send a frame, from one host, with the default flags and with
  --max-streams-per-peer 0; the streams' codes, health, Ground while they are open, and
  when the last is closed.
- send_blocked: a client with a 1 KiB HTTP/2 window sends a frame every 20 ms and reads no
  answer, against --stream-idle-timeout-s 5; how long the server's send was blocked when
  it closed the stream (its log line).
- drain_streams: 32 streams at 2 fps; SIGTERM (--drain-delay-s 2, --drain-grace-s 30); the
  time to exit, the streams' codes and trailers, and the drain log line.
"""

from __future__ import annotations

import io
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from benchmarks.attack_server import SCREENSHOT, Server, code_of, screenshot_rgb, status_name
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service_testlib import scrape

SKIPPED_FRAMES_KEY = "pixelprune-skipped-frames"


def screen_variants(count: int = 8) -> list[bytes]:
    """The corpus screenshot as PNG, each variant with one block changed (so each frame is new)."""
    shot, out = screenshot_rgb(), []
    for k in range(count):
        variant = shot.copy()
        variant.paste((k * 30 % 256, 0, 0), (32 * k, 0, 32 * k + 32, 32))
        buf = io.BytesIO()
        variant.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Streamer:
    """One stream sending `frames` round-robin at `fps` until stop() or cancel(); counts answers."""

    def __init__(self, server: Server, frames: list[bytes], fps: float, session: str):
        self._stop, self.answers, self.code, self.trailer = threading.Event(), 0, None, None
        self._frames, self._period, self._session = frames, 1.0 / fps, session
        self.call = server.stub().GroundStream(self._requests(), timeout=600)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _requests(self):
        sequence = 0
        while not self._stop.is_set():
            sequence += 1
            first = sequence == 1
            yield pb.Frame(image=pb.Image(encoded=self._frames[sequence % len(self._frames)]), sequence=sequence,
                           instruction="the terminal window" if first else "",
                           session_id=self._session if first else "")
            self._stop.wait(self._period)

    def _read(self):
        try:
            for _ in self.call:
                self.answers += 1
            self.code = "OK"
        except grpc.RpcError as exc:
            self.code = exc.code().name
        self.trailer = dict(self.call.trailing_metadata() or ()).get(SKIPPED_FRAMES_KEY)

    def stop(self):
        self._stop.set()

    def cancel(self):
        self._stop.set()
        self.call.cancel()

    def join(self, timeout: float = 120):
        self._thread.join(timeout)


def give_up(model: str, args) -> dict:
    server, frames = Server(model), screen_variants()
    try:
        streams = [Streamer(server, frames, 4.0, f"give-up-{k}") for k in range(64)]
        time.sleep(args.seconds / 2)
        for stream in streams[:16]:
            stream.cancel()
        time.sleep(args.seconds / 2)
        for stream in streams[16:]:
            stream.stop()
        for stream in streams:
            stream.join()
        deadline = time.monotonic() + 60
        while scrape(server.metrics_port)["pixelprune_open_streams"] and time.monotonic() < deadline:
            time.sleep(0.1)
        open_after = scrape(server.metrics_port)["pixelprune_open_streams"]
        request = pb.GroundRequest(image=pb.Image(encoded=SCREENSHOT.read_bytes()), instruction="the terminal window")
        after = Counter(code_of(lambda: server.stub().Ground(request, timeout=60)) for _ in range(10))
        fresh = server.stub().GroundStream(iter([pb.Frame(image=request.image, instruction="x", sequence=1)]),
                                           timeout=60)
        return {"streams": "64 at 4 fps, 16 cancelled at half time", "stream_codes": dict(Counter(
                    s.code for s in streams)), "answers": sum(s.answers for s in streams),
                "open_streams_after": int(open_after), "then_ground_codes": dict(after),
                "then_new_stream": code_of(lambda: list(fresh))}
    finally:
        server.stop()


def unary_vs_streams(model: str, args) -> dict:
    server, frames = Server(model), screen_variants()
    request = pb.GroundRequest(image=pb.Image(encoded=SCREENSHOT.read_bytes()), instruction="the terminal window")
    try:
        streams = [Streamer(server, frames, 2.0, f"load-{k}") for k in range(64)]
        time.sleep(2.0)
        end, codes = time.monotonic() + args.seconds, Counter()

        def caller(_):
            while time.monotonic() < end:
                code = code_of(lambda: server.stub().Ground(request, timeout=30))
                codes[code] += 1
                if code == "RESOURCE_EXHAUSTED":
                    time.sleep(0.2)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(caller, range(16)))
        for stream in streams:
            stream.stop()
        for stream in streams:
            stream.join()
        return {"duration_s": args.seconds, "unary_calls": sum(codes.values()), "unary_codes": dict(codes),
                "stream_answers": sum(s.answers for s in streams)}
    finally:
        server.stop()


def _ground_s(server: Server, images: list[bytes]) -> tuple[Counter, float]:
    """Ground once per image (distinct screenshots: no cache helps); codes and mean seconds."""
    started, codes = time.monotonic(), Counter()
    for data in images:
        request = pb.GroundRequest(image=pb.Image(encoded=data), instruction="the terminal window")
        codes[code_of(lambda: server.stub().Ground(request, timeout=30))] += 1
    return codes, round((time.monotonic() - started) / len(images), 2)


def _silent(model: str, *flags: str) -> dict:
    server, screens = Server(model, *flags), screen_variants(4)
    try:
        _, idle_s = _ground_s(server, screens[:2])
        gates, closed = [threading.Event() for _ in range(256)], []
        opened = time.monotonic()
        calls = [server.stub().GroundStream(iter(gate.wait, True), timeout=120) for gate in gates]
        time.sleep(1.0)
        open_streams = scrape(server.metrics_port)["pixelprune_open_streams"]

        def watch():  # when the last silent stream is closed, while Ground runs
            while scrape(server.metrics_port)["pixelprune_open_streams"] and time.monotonic() - opened < 120:
                time.sleep(0.05)
            closed.append(time.monotonic() - opened)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        during, during_s = _ground_s(server, screens[2:])
        main_health, health_port = server.health(server.port), server.health(server.health_port)
        watcher.join()
        closed_after = closed[0]
        codes = Counter(code_of(lambda c=call: list(c)) for call in calls)
        for gate in gates:
            gate.set()
        return {"flags": " ".join(flags) or "defaults", "open_while_silent": int(open_streams),
                "stream_codes": dict(codes), "ground_before_s": idle_s, "ground_while_open": dict(during),
                "ground_while_open_s": during_s, "main_port_health": status_name(main_health),
                "health_port": status_name(health_port), "all_closed_after_s": round(closed_after, 1)}
    finally:
        server.stop()


def idle(model: str, args) -> dict:
    """256 silent streams from one host: with the default flags (64 per peer), and with the
    per-peer limit off (--max-open-streams alone)."""
    return {"silent_streams": 256, "runs": [_silent(model), _silent(model, "--max-streams-per-peer", "0")]}


def send_blocked(model: str, args) -> dict:
    server = Server(model, "--stream-idle-timeout-s", "5")
    frame_png = screen_variants(1)[0]
    channel = server.open_channel(options=(("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)))
    stop = threading.Event()

    def frames():
        sequence = 0
        while not stop.is_set():
            sequence += 1
            yield pb.Frame(image=pb.Image(encoded=frame_png), instruction="x", session_id="blocked", sequence=sequence)
            time.sleep(0.02)

    try:
        call = server.stub(channel).GroundStream(frames(), timeout=600)
        started, closed = time.monotonic(), None
        while time.monotonic() - started < 120 and closed is None:
            samples = scrape(server.metrics_port)
            if samples["pixelprune_streams_closed_by_server_total{reason=send_timeout}"]:
                closed = time.monotonic() - started
            time.sleep(0.05)
        stop.set()
        blocked = re.search(r"could not be sent for ([0-9.]+) s", server.log_text())
        answered = samples["pixelprune_stream_frame_duration_seconds_count{code=OK}"]
        return {"idle_timeout_s": 5, "answers_sent": int(answered),
                "closed_after_open_s": None if closed is None else round(closed, 1),
                "send_blocked_for_s": blocked and float(blocked.group(1)), "client_sees": code_of(lambda: list(call))}
    finally:
        stop.set()
        channel.close()
        server.stop()


def drain_streams(model: str, args) -> dict:
    server, frames = Server(model, "--drain-delay-s", "2", "--drain-grace-s", "30"), screen_variants()
    streams = [Streamer(server, frames, 2.0, f"drain-{k}") for k in range(32)]
    time.sleep(3.0)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    exit_code = server.proc.wait(timeout=120)
    exit_s = time.monotonic() - started
    for stream in streams:
        stream.stop()
        stream.join()
    line = next((line for line in server.log_text().splitlines() if "drain: " in line), None)
    server.channel.close()
    return {"streams": 32, "delay_s": 2, "grace_s": 30, "sigterm_to_exit_s": round(exit_s, 1), "exit_code": exit_code,
            "stream_codes": dict(Counter(s.code for s in streams)),
            "trailers_seen": sum(s.trailer is not None for s in streams), "log": line and line.split("drain: ", 1)[1]}


ATTACKS = {"give_up": give_up, "unary_vs_streams": unary_vs_streams, "idle": idle, "send_blocked": send_blocked,
           "drain_streams": drain_streams}
