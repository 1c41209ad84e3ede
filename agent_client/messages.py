"""The service's messages as Python values: pruning settings in; GroundResult (with the keep
mask the server used) and GroundingError out. No network here: agent_client.client calls."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import grpc
import numpy as np

from pixelprune.keepmask import pack_keep, unpack_keep
from pixelprune_api.grounding.v1 import grounding_pb2 as pb

BLOCK_PX = 32  # side of one block (one visual token) of the model's image, pixels
METHODS = {"pred2d": pb.PruningSettings.METHOD_PRED2D, "raster": pb.PruningSettings.METHOD_RASTER,
           "serpentine": pb.PruningSettings.METHOD_SERPENTINE}
METRICS = {"max": pb.PruningSettings.METRIC_MAX, "mae": pb.PruningSettings.METRIC_MAE}


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
    queue_ms: float  # waiting for a place in the engine's line and for the engine to admit the request
    total_ms: float  # arrival to answer
    upload_ms: float = 0.0  # host -> device copy of the screenshot (GPU preprocessing; 0 on a CPU server)


def keep_from_pb(r: pb.GroundResponse) -> np.ndarray | None:
    """The response's keep mask as bool (model_height/32, model_width/32); None when absent.
    GroundingError when it does not fit the model size or its bits are damaged."""
    if not r.HasField("keep_mask"):
        return None
    m, grid = r.keep_mask, (r.model_height // BLOCK_PX, r.model_width // BLOCK_PX)
    if (m.rows, m.cols) != grid:
        raise GroundingError(f"the server sent a {m.rows}x{m.cols} keep mask for a {r.model_width}x"
                             f"{r.model_height} model image ({grid[0]}x{grid[1]} blocks)")
    try:
        return unpack_keep(m.rows, m.cols, m.bits)
    except ValueError as exc:
        raise GroundingError(f"the server sent a damaged keep mask: {exc}") from None


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
    prefix_cache_hit: bool = False  # the screen's prompt-prefix KV cache was reused: only the instruction was prefilled
    kv_cache_bytes: int = 0  # key/value bytes of the prompt's cache after prefill (0: the model did not run)
    answer_logprob: float = 0.0  # sum of the answer tokens' natural-log probabilities: the model's confidence
    # bool (model_height/32, model_width/32), row-major over the blocks of the resized image,
    # True = the model saw that block; None when the server sent none (a session cache hit on an
    # answer stored by an older server). Not part of ==.
    keep: np.ndarray | None = field(default=None, compare=False)

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
                            t.prefill_ms, t.ttft_ms, t.decode_tokens_ms, t.queue_ms, t.total_ms, t.upload_ms),
            image_size=(r.image_width, r.image_height), model_size=(r.model_width, r.model_height),
            random_weights=r.random_weights, prefix_cache_hit=r.prefix_cache_hit,
            kv_cache_bytes=r.kv_cache_bytes, answer_logprob=r.answer_logprob, keep=keep_from_pb(r))

    def to_json_dict(self) -> dict:
        """A JSON-ready dict (points as {"x", "y"} objects or null; the keep mask as the proto's
        rows, cols and base64 bits, most significant bit first, or null)."""
        def xy(p):
            return None if p is None else {"x": p[0], "y": p[1]}
        keep_mask = None
        if self.keep is not None:
            rows, cols, bits = pack_keep(self.keep)
            keep_mask = {"rows": rows, "cols": cols, "bits": base64.b64encode(bits).decode()}
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
            "random_weights": self.random_weights, "prefix_cache_hit": self.prefix_cache_hit,
            "kv_cache_bytes": self.kv_cache_bytes, "answer_logprob": self.answer_logprob, "keep_mask": keep_mask,
        }
