"""Python client of the PixelPrune grounding service (`pixelprune.grounding.v1`).

    with GroundingClient("localhost:50051", token="s3cret") as client:
        result = client.ground("screen.png", "click the Save button")
        if result.point is not None:
            x, y = result.point          # pixels of the screenshot as sent

Images may be a path, file bytes, a PIL image or a uint8 (H, W, 3) RGB array.
PNG / JPEG / WebP bytes (from a path or given as bytes) are sent as they are:
the server decodes them. Pixels (arrays, PIL images, other file formats) are
PNG-encoded with zlib level 1, the fastest level that still compresses
screenshots ~20x (a 1080p desktop: 6.2 MB raw -> 0.31 MB in ~45 ms on one Xeon
core; level 6 saves 6% more for 40% more time). The raw RGB form of the proto is
used instead when it is smaller (noise-like images) or when it is the only one
that fits the message limit, or always with `frame_encoding="raw"` (no encoding
cost; worth it on loopback).

Unary calls are retried on UNAVAILABLE only (server down, restarting, or not
yet listening), with exponential backoff and jitter, inside one overall
deadline (`timeout`). Every other status is final: retrying a bad request or a
bad token cannot succeed. Streams are not retried (their frames cannot be
replayed); a live loop reopens the stream instead. Failures surface as
`GroundingError` (subclasses per cause) whose message is one line.
"""

from __future__ import annotations

import io
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

import grpc
import numpy as np
from PIL import Image

from pixelprune.geometry import to_rgb_array
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc

log = logging.getLogger("agent_client")

DEFAULT_TIMEOUT_S = 30.0  # overall deadline of one unary call, retries included
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # send/receive limit; a raw 4K frame is 24 MiB
MESSAGE_OVERHEAD_BYTES = 16 * 1024  # instruction, session id, settings and framing beside the image
PNG_COMPRESS_LEVEL = 1  # zlib level for frames encoded here: fastest that still compresses
BACKOFF_INITIAL_S = 0.2  # first retry delay before jitter; doubles per retry
BACKOFF_MAX_S = 5.0  # cap of one retry delay

METHODS = {"pred2d": pb.PruningSettings.METHOD_PRED2D, "raster": pb.PruningSettings.METHOD_RASTER,
           "serpentine": pb.PruningSettings.METHOD_SERPENTINE}
METRICS = {"max": pb.PruningSettings.METRIC_MAX, "mae": pb.PruningSettings.METRIC_MAE}
FRAME_ENCODINGS = ("png", "raw")

ImageInput = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]


class GroundingError(Exception):
    """A failed call, described in one line; `code` is the gRPC status (None if local)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class ServerUnavailable(GroundingError):
    """The server could not be reached (after the retries)."""


class AuthenticationError(GroundingError):
    """The server refused the token (missing or wrong)."""


class InvalidRequest(GroundingError):
    """The server rejected the request's content (image, instruction, settings)."""


@dataclass(frozen=True)
class Timings:
    """Server-side stage durations of one answer, in milliseconds (0 = stage skipped)."""

    decode_ms: float  # image bytes -> pixels
    resize_ms: float  # smart_resize to the model's grid
    select_ms: float  # PixelPrune block selection
    patchify_ms: float  # normalising and patchifying the kept blocks
    vit_ms: float  # vision encoder and mergers
    prefill_ms: float  # LLM prefill
    ttft_ms: float  # arrival to first generated token
    decode_tokens_ms: float  # the remaining generated tokens
    queue_ms: float  # waiting for the model worker
    total_ms: float  # arrival to answer


@dataclass(frozen=True)
class GroundResult:
    """One answer of the service, in the screenshot's own pixels."""

    point: tuple[float, float] | None  # (x, y) px of the screenshot as sent; None = no point in the answer
    point_normalized: tuple[float, float] | None  # (x, y) in [0, 1] of width and height
    raw_answer: str  # the model's text
    kept_blocks: int  # visual tokens (32x32 blocks) the model saw
    total_blocks: int  # blocks of the resized image
    retain_ratio: float  # kept_blocks / total_blocks
    changed_fraction: float  # share of blocks changed since the session's previous frame (1.0 if none)
    cache_hit: bool  # answered from the session (same frame, same instruction)
    vision_cache_hit: bool  # vision encoder output reused (same frame, new instruction)
    session_id: str  # the session this answer belongs to
    skipped_frames: int  # stream: frames dropped for newer ones since the previous answer
    sequence: int  # stream: sequence number of the answered frame (0 for Ground)
    timings: Timings  # server-side stage durations
    image_size: tuple[int, int]  # (width, height) of the screenshot as sent
    model_size: tuple[int, int]  # (width, height) after the model's resize
    random_weights: bool  # the served model has random weights: the point means nothing

    @property
    def ttft_ms(self) -> float:
        """Arrival to first generated token, ms."""
        return self.timings.ttft_ms

    @classmethod
    def from_pb(cls, r: pb.GroundResponse) -> GroundResult:
        t = r.timings
        return cls(
            point=(r.point.x, r.point.y) if r.found else None,
            point_normalized=(r.point_normalized.x, r.point_normalized.y) if r.found else None,
            raw_answer=r.raw_answer, kept_blocks=r.kept_blocks, total_blocks=r.total_blocks,
            retain_ratio=r.retain_ratio, changed_fraction=r.changed_fraction, cache_hit=r.cache_hit,
            vision_cache_hit=r.vision_cache_hit, session_id=r.session_id,
            skipped_frames=r.skipped_frames, sequence=r.sequence,
            timings=Timings(t.decode_ms, t.resize_ms, t.select_ms, t.patchify_ms, t.vit_ms,
                            t.prefill_ms, t.ttft_ms, t.decode_tokens_ms, t.queue_ms, t.total_ms),
            image_size=(r.image_width, r.image_height), model_size=(r.model_width, r.model_height),
            random_weights=r.random_weights)

    def to_json_dict(self) -> dict:
        """A JSON-ready dict (points as {"x", "y"} objects or null)."""
        def xy(p):
            return None if p is None else {"x": p[0], "y": p[1]}
        return {
            "point": xy(self.point), "point_normalized": xy(self.point_normalized),
            "raw_answer": self.raw_answer, "kept_blocks": self.kept_blocks,
            "total_blocks": self.total_blocks, "retain_ratio": self.retain_ratio,
            "changed_fraction": self.changed_fraction, "cache_hit": self.cache_hit,
            "vision_cache_hit": self.vision_cache_hit, "session_id": self.session_id,
            "skipped_frames": self.skipped_frames, "sequence": self.sequence,
            "ttft_ms": self.ttft_ms, "timings": dict(vars(self.timings)),
            "image_size": {"width": self.image_size[0], "height": self.image_size[1]},
            "model_size": {"width": self.model_size[0], "height": self.model_size[1]},
            "random_weights": self.random_weights,
        }


def is_encoded_image(data: bytes) -> bool:
    """True for PNG, JPEG or WebP file bytes (by magic number): the formats the server decodes."""
    return (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def encode_pixels(pixels: np.ndarray, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  frame_encoding: str = "png") -> pb.Image:
    """A uint8 (H, W, 3) RGB array as a proto Image: PNG (level 1) or raw, whichever is
    preferred and fits the message limit (see the module docstring)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 \
            or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise ValueError(f"image array must be uint8 (H, W, 3) RGB with H, W > 0, got {dtype} {shape}")
    if frame_encoding not in FRAME_ENCODINGS:
        raise ValueError(f"frame_encoding must be one of {FRAME_ENCODINGS}, got {frame_encoding!r}")
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    limit = max_message_bytes - MESSAGE_OVERHEAD_BYTES
    raw = lambda: pb.Image(raw=pb.RawImage(width=width, height=height, rgb=pixels.tobytes()))  # noqa: E731
    if frame_encoding == "raw" and pixels.nbytes <= limit:
        return raw()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    png = buf.getvalue()
    smallest = min(len(png), pixels.nbytes)
    if smallest > limit:
        raise ValueError(f"a {width}x{height} image is {smallest} bytes even as PNG, over the message limit "
                         f"of {max_message_bytes} bytes: raise max_message_bytes (and the server's "
                         "--max-message-bytes) or send a smaller image")
    return pb.Image(encoded=png) if len(png) <= pixels.nbytes else raw()


def encode_image(image: ImageInput, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 frame_encoding: str = "png") -> pb.Image:
    """Any accepted image input as a proto Image. PNG/JPEG/WebP bytes go as they are."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        data = path.read_bytes()
        if is_encoded_image(data):
            return _checked_encoded(data, max_message_bytes)
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels = to_rgb_array(im)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{path}: not an image file Pillow can read ({exc})") from None
        return encode_pixels(pixels, max_message_bytes, frame_encoding)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not is_encoded_image(data):
            raise ValueError("image bytes are not PNG, JPEG or WebP; pass raw pixels as a uint8 (H, W, 3) array")
        return _checked_encoded(data, max_message_bytes)
    if isinstance(image, Image.Image):
        return encode_pixels(to_rgb_array(image), max_message_bytes, frame_encoding)
    if isinstance(image, np.ndarray):
        return encode_pixels(image, max_message_bytes, frame_encoding)
    raise ValueError(f"unsupported image input {type(image).__name__}: "
                     "use a path, PNG/JPEG/WebP bytes, a PIL image or a uint8 (H, W, 3) array")


def _checked_encoded(data: bytes, max_message_bytes: int) -> pb.Image:
    if len(data) > max_message_bytes - MESSAGE_OVERHEAD_BYTES:
        raise ValueError(f"image file is {len(data)} bytes, over the message limit of {max_message_bytes} "
                         "bytes: raise max_message_bytes (and the server's --max-message-bytes)")
    return pb.Image(encoded=data)


def pruning_settings(method: str | None = None, metric: str | None = None, tau: float | None = None,
                     prune: bool = True) -> pb.PruningSettings:
    """Proto pruning settings; None fields take the server's defaults."""
    settings = pb.PruningSettings(disabled=not prune)
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"unknown pruning method {method!r}; choose one of {sorted(METHODS)}")
        settings.method = METHODS[method]
    if metric is not None:
        if metric not in METRICS:
            raise ValueError(f"unknown pruning metric {metric!r}; choose one of {sorted(METRICS)}")
        settings.metric = METRICS[metric]
    if tau is not None:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and 0.0 <= tau <= 1.0):
            raise ValueError(f"tau must be a finite number in [0, 1], got {tau!r}")
        settings.tau = float(tau)
    return settings


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no details"


def _channel_credentials(tls) -> grpc.ChannelCredentials | None:
    """None/False -> plaintext; True -> TLS with the system roots; bytes or a path -> those roots."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    roots = bytes(tls) if isinstance(tls, (bytes, bytearray)) else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=roots)


class GroundingClient:
    """A channel to one grounding server; use as a context manager (closes the channel)."""

    def __init__(self, target: str, token: str | None = None, tls=None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: int = 3,
                 frame_encoding: str = "png", backoff_initial: float = BACKOFF_INITIAL_S,
                 backoff_max: float = BACKOFF_MAX_S):
        if not target or not isinstance(target, str):
            raise ValueError("target must be HOST:PORT")
        if not (timeout > 0 and retries >= 0 and max_message_bytes > MESSAGE_OVERHEAD_BYTES
                and 0 < backoff_initial <= backoff_max):
            raise ValueError("timeout, backoff_initial, backoff_max must be > 0 (initial <= max), retries >= 0, "
                             f"max_message_bytes > {MESSAGE_OVERHEAD_BYTES}")
        if frame_encoding not in FRAME_ENCODINGS:
            raise ValueError(f"frame_encoding must be one of {FRAME_ENCODINGS}, got {frame_encoding!r}")
        if token is not None and (not token.strip() or not token.strip().isprintable() or not token.isascii()):
            raise ValueError("token must be non-empty printable ASCII (one line)")
        self.target, self.timeout, self.retries = target, float(timeout), int(retries)
        self.max_message_bytes, self.frame_encoding = int(max_message_bytes), frame_encoding
        self.backoff_initial, self.backoff_max = float(backoff_initial), float(backoff_max)
        self._metadata = (("authorization", f"Bearer {token.strip()}"),) if token is not None else ()
        self._has_token = token is not None
        self._jitter = random.Random()
        options = [("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.max_receive_message_length", self.max_message_bytes),
                   # Reconnect about as eagerly as we retry, so a server that comes up is seen.
                   ("grpc.initial_reconnect_backoff_ms", int(self.backoff_initial * 1000)),
                   ("grpc.min_reconnect_backoff_ms", int(self.backoff_initial * 1000)),
                   ("grpc.max_reconnect_backoff_ms", int(self.backoff_max * 1000))]
        creds = _channel_credentials(tls)
        self._channel = (grpc.insecure_channel(target, options=options) if creds is None
                         else grpc.secure_channel(target, creds, options=options))
        self._stub = pb_grpc.GroundingStub(self._channel)

    def __enter__(self) -> GroundingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._channel.close()

    def ground(self, image: ImageInput, instruction: str, session_id: str | None = None,
               method: str | None = None, metric: str | None = None, tau: float | None = None,
               prune: bool = True) -> GroundResult:
        """Ground `instruction` on one screenshot. Retries UNAVAILABLE within `timeout`."""
        _check_instruction(instruction)
        request = pb.GroundRequest(
            image=encode_image(image, self.max_message_bytes, self.frame_encoding), instruction=instruction,
            session_id=session_id or "", pruning=pruning_settings(method, metric, tau, prune))
        return GroundResult.from_pb(self._with_retries("Ground", self._stub.Ground, request))

    def _with_retries(self, name: str, rpc, request):
        """Call a unary rpc within one deadline of `timeout` seconds, retrying UNAVAILABLE
        only, after min(backoff_max, backoff_initial * 2**n) seconds times a jitter in [0.5, 1]
        (so that clients cut off together do not come back together)."""
        deadline = time.monotonic() + self.timeout
        for attempt in range(self.retries + 1):
            try:
                return rpc(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise self._error(exc) from None
                delay = min(self.backoff_max, self.backoff_initial * 2 ** attempt) * self._jitter.uniform(0.5, 1.0)
                if time.monotonic() + delay >= deadline:
                    raise self._error(exc) from None
                log.info("%s: server %s unavailable; retry %d of %d in %.2f s",
                         name, self.target, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def stream(self, frames: Iterable, instruction: str, session_id: str | None = None,
               method: str | None = None, metric: str | None = None, tau: float | None = None,
               prune: bool = True, timeout: float | None = None) -> Iterator[GroundResult]:
        """Stream frames in one session and yield the answers as they come.

        Each item of `frames` is an image, or `(image, new_instruction)` to change the
        instruction from that frame on. The n-th frame gets sequence number n (from 1),
        echoed in `GroundResult.sequence`; when frames arrive faster than answers, the
        server answers the newest and reports the dropped ones in `skipped_frames`, so
        frames sent == answers + sum(skipped_frames). `timeout` bounds the whole stream
        (None = no deadline). Not retried. Closing the generator cancels the call."""
        _check_instruction(instruction)  # checked now, not at the first next()
        settings = pruning_settings(method, metric, tau, prune)
        return self._stream(frames, instruction, session_id, settings, timeout)

    def _stream(self, frames, instruction, session_id, settings, timeout) -> Iterator[GroundResult]:
        failure: list[BaseException] = []
        call = self._stub.GroundStream(self._requests(frames, instruction, session_id, settings, failure),
                                       timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield GroundResult.from_pb(response)
        except grpc.RpcError as exc:
            if failure:
                raise failure[0] from None
            raise self._error(exc, timeout) from None
        finally:
            call.cancel()
        if failure:
            raise failure[0]

    def _requests(self, frames: Iterable, instruction: str, session_id: str | None,
                  settings: pb.PruningSettings, failure: list) -> Iterator[pb.Frame]:
        """Frames as protos. An error here (bad image, capture failure) ends the stream
        cleanly and is re-raised by `stream` instead of being lost in gRPC's thread."""
        try:
            for sequence, item in enumerate(frames, start=1):
                image, new_instruction = item if isinstance(item, tuple) else (item, None)
                frame = pb.Frame(image=encode_image(image, self.max_message_bytes, self.frame_encoding),
                                 sequence=sequence)
                if new_instruction:
                    _check_instruction(new_instruction)
                if sequence == 1:  # a first frame's own instruction wins over the stream's
                    frame.instruction, frame.session_id = new_instruction or instruction, session_id or ""
                    frame.pruning.CopyFrom(settings)
                elif new_instruction:
                    frame.instruction = new_instruction
                yield frame
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    def _error(self, exc: grpc.RpcError, timeout: float | None = None) -> GroundingError:
        """One place that turns a gRPC status into a one-line GroundingError."""
        code, details = exc.code(), _one_line(exc.details() or "")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnavailable(f"cannot reach the grounding server at {self.target}: {details}", code)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            why = "a bad token" if self._has_token else "no token given"
            return AuthenticationError(f"the server at {self.target} refused the request ({why}): {details}", code)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(f"the server rejected the request: {details}", code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            limit = self.timeout if timeout is None else timeout
            return GroundingError(f"no answer from {self.target} within {limit:g} s", code)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return GroundingError(f"the server at {self.target} is overloaded or the message too large: {details}",
                                  code)
        return GroundingError(f"{code.name} from {self.target}: {details}", code)


def _check_instruction(instruction: str) -> None:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string")
