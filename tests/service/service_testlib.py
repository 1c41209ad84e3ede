"""Helpers of the service tests: an instruction-recording engine wrapper, image encoders,
a request feed for streams, a /metrics scraper. Imported by name (pytest puts this folder on
sys.path), like the other test folders' *_testlib modules."""

from __future__ import annotations

import io
import queue
import threading
import time
import urllib.request

import grpc
import numpy as np
from PIL import Image

from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc

MAX_NEW_TOKENS = 4  # enough for the random model to say something; keeps each run short


class CountingEngine:
    """The real engine, with a record of the instructions it ran (to prove what did NOT run)."""

    def __init__(self, engine):
        self._engine = engine
        self.grounded: list[str] = []
        self.lock = threading.Lock()

    def ground(self, prepared, instruction, vision=None, **kwargs):
        with self.lock:
            self.grounded.append(instruction)
        return self._engine.ground(prepared, instruction, vision=vision, **kwargs)

    def step(self, on_step=None):
        """One engine step (what the engine loop calls): records the requests it admitted."""
        before = {id(s) for s in self._engine.scheduler.running}
        ended = self._engine.step(on_step)
        with self.lock:
            self.grounded.extend(s.payload.instruction for s in self._engine.scheduler.running if id(s) not in before)
        return ended

    def __getattr__(self, name):
        return getattr(self._engine, name)


def stub_for(channel) -> pb_grpc.GroundingStub:
    return pb_grpc.GroundingStub(channel)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def raw_image(pixels: np.ndarray) -> pb.Image:
    height, width = pixels.shape[:2]
    return pb.Image(raw=pb.RawImage(width=width, height=height, rgb=np.ascontiguousarray(pixels).tobytes()))


def scrape(metrics_port: int) -> dict[str, float]:
    """/metrics -> {sample name with sorted labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


class FrameFeed:
    """A request iterator the test feeds one frame at a time (None ends it)."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self.drained = threading.Event()  # set once the server has read every frame and the end

    def send(self, frame: pb.Frame | None) -> None:
        self._queue.put(frame)

    def __iter__(self):
        while (frame := self._queue.get()) is not None:
            yield frame
        self.drained.set()


def jpeg_bomb(width: int = 7071, height: int = 7071) -> bytes:
    """The 641-byte JPEG bomb: a real 8x8 JPEG's headers with the frame size set to
    width x height, then 16 zero bytes of scan data and the end marker. Pillow decodes it to
    width x height pixels (the missing data as grey)."""
    data = jpeg_bytes(np.full((8, 8, 3), 128, np.uint8), quality=50)
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    header = bytearray(data[:sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")])
    header[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(header) + bytes(16) + b"\xff\xd9"


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose IHDR claims width x height (valid CRC): pixels that never existed."""
    import struct
    import zlib

    data = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])))
    return bytes(data)


def hold_engine(handle):
    """Occupy the engine loop with a call that waits; returns the event that releases it."""
    release, running = threading.Event(), threading.Event()
    handle.loop.call(lambda: (running.set(), release.wait(60)))
    assert running.wait(10)
    return release


def wait_until(predicate, timeout=20.0):
    """Poll `predicate` every 10 ms until it holds; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def status_code(fn):
    """The gRPC status code of calling fn() (OK when it returns)."""
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def jpeg_scan_bomb(size: int = 7071, scans: int = 1000) -> bytes:
    """A progressive grey JPEG of size x size whose last scan is repeated until it holds `scans`
    scans: a few hundred bytes per scan, and libjpeg decodes every one over the whole image."""
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="JPEG", quality=50, progressive=True)
    data = buf.getvalue()
    first_scan = data.index(b"\xff\xda")
    last_scan = data.rindex(b"\xff\xda")  # entropy-coded data never holds FF DA (0xFF is stuffed)
    body, last = data[first_scan:last_scan], data[last_scan:-2]
    written = body.count(b"\xff\xda") + 1
    return data[:first_scan] + body + last * (scans - written + 1) + b"\xff\xd9"


def png16(samples: np.ndarray, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG from uint16 samples: (H, W) grey, (H, W, 2) grey + alpha, (H, W, 3) RGB or
    (H, W, 4) RGBA; `trns` the raw tRNS chunk (a transparent grey or RGB value). Pillow writes
    no 16-bit colour PNGs, so this writes the chunks itself (PNG spec: IHDR, IDAT, IEND)."""
    import struct
    import zlib

    height, width = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = samples.reshape(height, width * channels).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
    extra = chunk(b"tRNS", trns) if trns is not None else b""
    return b"\x89PNG\r\n\x1a\n" + header + extra + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
