"""Attacks through what a request carries: the progressive-JPEG scan bomb, decoding for a caller
that is gone, unauthenticated 60 MB messages, 16-bit PNGs. Run by `python -m benchmarks.attacks`.

- scan_bomb: 4 attackers send a 270 KB progressive JPEG (7071 x 7071, 1,000 scans, what
  libjpeg would decode for ~30 s) with a 5 s deadline while a victim sends the corpus
  screenshot; the attackers' codes and latencies, the victim's share of OK.
- interrupt: in process, no server: a 7000 x 7000 PNG, baseline JPEG and progressive JPEG
  decoded whole, timing the checks of is_active() (the longest stretch between two is how
  long decoding can go on for a caller that is gone), then with the caller gone 0.1 s in.
- unauth: --auth-token-file; 24 concurrent 60 MB Ground messages with a wrong token, then
  255 concurrent 4 MB ones (every RPC slot but one); peak RSS above idle and RSS after.
- png16: the corpus screenshot as 8-bit and 16-bit PNGs (grey and RGB); retain ratios.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.attack_server import SCREENSHOT, PeakRss, Server, code_of, median, screenshot_rgb
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service_testlib import jpeg_scan_bomb, png16

BOMB_SIZE, BOMB_SCANS = 7071, 1000


def scan_bomb(model: str, args) -> dict:
    server = Server(model)
    bomb = pb.GroundRequest(image=pb.Image(encoded=jpeg_scan_bomb(BOMB_SIZE, BOMB_SCANS)), instruction="x")
    victim = pb.GroundRequest(image=pb.Image(encoded=SCREENSHOT.read_bytes()), instruction="the terminal window")
    stop, attacks, attack_ms = threading.Event(), Counter(), []

    def attacker():
        while not stop.is_set():
            start = time.perf_counter()
            attacks[code_of(lambda: server.stub().Ground(bomb, timeout=5))] += 1
            attack_ms.append(1000 * (time.perf_counter() - start))

    try:
        threads = [threading.Thread(target=attacker, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        victims, end = Counter(), time.monotonic() + args.seconds
        while time.monotonic() < end:
            victims[code_of(lambda: server.stub().Ground(victim, timeout=30))] += 1
        stop.set()
        for thread in threads:
            thread.join()
        return {"bomb_bytes": len(bomb.image.encoded), "bomb": f"{BOMB_SIZE}x{BOMB_SIZE}, {BOMB_SCANS} scans",
                "attacker_codes": dict(attacks), "attacker_median_ms": round(median(attack_ms), 1),
                "victim_codes": dict(victims), "victim_ok_share": round(victims["OK"] / sum(victims.values()), 3)}
    finally:
        server.stop()


def _page(fmt: str, **options) -> bytes:
    """7000 x 7000: the corpus screenshot tiled on a white page, encoded as `fmt`."""
    page, shot = Image.new("RGB", (7000, 7000), (255, 255, 255)), screenshot_rgb()
    for k in range(0, 7000, 1080):
        page.paste(shot, ((k // 1080) % 4 * 1200, k))
    buf = io.BytesIO()
    page.save(buf, format=fmt, **options)
    return buf.getvalue()


def _checks(data: bytes) -> dict:
    """A whole decode, timing each question to is_active(): the longest stretch between two (or
    after the last): how long decoding can go on once its caller is gone."""
    from service.images import decode_encoded

    asked = [time.perf_counter()]
    decode_encoded(data, 50_000_000, lambda: asked.append(time.perf_counter()) or True)
    asked.append(time.perf_counter())
    gaps = np.diff(asked)
    return {"whole_decode_s": round(asked[-1] - asked[0], 2), "checks": len(asked) - 2,
            "longest_unchecked_s": round(float(gaps.max()), 3), "after_last_check_s": round(float(gaps[-1]), 3)}


def _gone_after(data: bytes, gone_at: float) -> dict:
    """Decode with the caller gone `gone_at` seconds in: the outcome and the seconds decoded after."""
    from service.errors import Cancelled
    from service.images import decode_encoded

    start = time.perf_counter()
    try:
        decode_encoded(data, 50_000_000, lambda: time.perf_counter() - start < gone_at)
        outcome = "finished"
    except Cancelled:
        outcome = "cancelled"
    return {"gone_at_s": gone_at, "outcome": outcome,
            "went_on_after_gone_s": round(time.perf_counter() - start - gone_at, 3)}


def interrupt(model: str, args) -> dict:
    """Decoding stops at the next 64 KiB read once the caller is gone (service/images.py)."""
    out = {}
    for name, data in (("png", _page("PNG")), ("baseline_jpeg", _page("JPEG", quality=90)),
                       ("progressive_jpeg", _page("JPEG", quality=90, progressive=True))):
        out[name] = {"bytes": len(data), **_checks(data), "gone_0.1s_in": _gone_after(data, 0.1)}
    return out


def _denied_rss(server: Server, calls: int, size: int) -> dict:
    """`calls` concurrent Ground messages of `size` bytes with a wrong token, each on its own
    connection: codes, peak RSS above idle, RSS left after."""
    idle = server.rss_mb()
    request = pb.GroundRequest(image=pb.Image(encoded=os.urandom(size)), instruction="x")
    wrong = [("authorization", "Bearer not-the-token")]

    def call(_):
        with server.open_channel() as channel:
            return code_of(lambda: server.stub(channel).Ground(request, metadata=wrong, timeout=120))

    started = time.monotonic()
    with PeakRss(server.proc.pid) as peak, ThreadPoolExecutor(calls) as pool:
        codes = Counter(pool.map(call, range(calls)))
    took = time.monotonic() - started
    time.sleep(1.0)
    return {"messages": f"{calls} x {size / 1e6:g} MB", "codes": dict(codes), "calls_took_s": round(took, 2),
            "idle_rss_mb": round(idle), "peak_above_idle_mb": round(peak.mb - idle),
            "after_above_idle_mb": round(server.rss_mb() - idle)}


def unauth(model: str, args) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        token = Path(workdir, "token")
        token.write_text("the-right-token\n")
        server = Server(model, "--auth-token-file", str(token))
        try:
            time.sleep(1.0)
            return {"wrong_token": [_denied_rss(server, 24, 60_000_000), _denied_rss(server, 255, 4_000_000)]}
        finally:
            server.stop()


def png16_retain(model: str, args) -> dict:
    shot = np.asarray(screenshot_rgb())
    grey = np.asarray(Image.fromarray(shot).convert("L"))
    variants = {"grey_8bit": _png(grey), "grey_16bit": png16(grey.astype(np.uint16) * 257),
                "rgb_8bit": _png(shot), "rgb_16bit": png16(shot.astype(np.uint16) * 257)}
    server = Server(model)
    try:
        out = {}
        for name, data in variants.items():
            answer = server.stub().Ground(pb.GroundRequest(image=pb.Image(encoded=data), instruction="x"), timeout=120)
            out[name] = {"bytes": len(data), "retain_ratio": round(answer.retain_ratio, 3),
                         "kept_blocks": answer.kept_blocks, "total_blocks": answer.total_blocks}
        return out
    finally:
        server.stop()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


ATTACKS = {"scan_bomb": scan_bomb, "interrupt": interrupt, "unauth": unauth, "png16": png16_retain}
