"""The service's domain function: one screenshot + instruction -> one answer, with session reuse.

    source digest -> session lookup -> (same bytes, instruction, settings: answer from the session)
    -> decode -> prepare (resize, select, patchify) -> block hashes
    -> changed fraction vs the previous frame -> (all blocks equal, same instruction and settings:
       answer from the session, as ARCHITECTURE.md prescribes; a hash collision could only
       mislead the client's own session, with probability ~2**-64 per changed block)
    -> a place in the engine's waiting line (service/admission.py) -> the engine loop, batched
       with other requests: prompt prefix or vision features reused for the same frame (skip
       the ViT and the image's prefill), prefill, decode
    -> save the session -> GroundAnswer

Everything before the model step runs on the calling RPC thread, so the engine
loop's thread only ever runs the model. The engine's prefix and vision caches are
shared by all sessions, so their key is exact: the tenant, a cryptographic digest of
the request's image bytes (never the 64-bit block hashes), the pruning settings and
the resized size. No gRPC types here: the servicer converts.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from pixelprune.hashing import block_hashes
from pixelprune.keepmask import pack_keep
from pixelprune.settings import PruneSettings
from pixelprune.timings import Timings
from pixelprune.model.request import GroundRequest
from pixelprune.model.step import Status
from service.admission import STREAM, UNARY, Admission
from service.errors import Cancelled, DeadlineExpired
from service.images import RawImage, decode_image
from service.metrics import ServiceMetrics
from service.sessions import CachedAnswer, SessionState, SessionStore, session_key

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True)
class GroundQuery:
    image: bytes | RawImage | None  # encoded PNG/JPEG/WebP bytes or raw RGB
    instruction: str  # what to find
    session_id: str  # "" = no session
    pruning: PruneSettings  # resolved at the edge (request fields over the server's defaults)
    tenant: str = ""  # the caller's tenant (service/auth.py); sessions and caches are per tenant

    @property
    def session_key(self) -> str:
        """The session's key in the store: the session id within the caller's tenant."""
        return session_key(self.tenant, self.session_id)


@dataclass(frozen=True)
class GroundAnswer:
    found: bool  # the model's answer contained a point
    point: tuple[float, float] | None  # pixels of the screenshot as sent
    point_normalized: tuple[float, float] | None  # [0, 1] of width and height
    raw_answer: str  # the model's text
    kept_blocks: int  # visual tokens the model saw
    total_blocks: int  # visual tokens of the full image
    changed_fraction: float  # share of blocks changed since the session's previous frame
    cache_hit: bool  # answered from the session, no model
    vision_cache_hit: bool  # the vision features were reused
    session_id: str  # "" without a session
    timings: Timings  # seconds per stage (pixelprune.timings), with the events of the way to the first token
    image_size: tuple[int, int]  # (W, H) as sent
    model_size: tuple[int, int]  # (w, h) after smart_resize
    random_weights: bool  # the model has random weights: the answer means nothing
    # bool (model_h/32, model_w/32), True = block the model saw; None on a cache hit from a
    # session stored without one
    keep: np.ndarray | None = field(default=None, compare=False)
    prefix_cache_hit: bool = False  # the prompt prefix's keys/values were reused: only the instruction was prefilled
    kv_cache_bytes: int = 0  # key/value bytes of the prompt's cache after prefill (0: the model did not run)
    answer_logprob: float = 0.0  # sum of the answer tokens' natural-log probabilities under the model

    @property
    def retain_ratio(self) -> float:
        return self.kept_blocks / self.total_blocks if self.total_blocks else 0.0


def source_digest(image: bytes | RawImage | None) -> bytes:
    """Identity of the request's image as sent (cheap: no decoding)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, RawImage):
        h.update(b"raw%d,%d:" % (image.width, image.height))
        h.update(image.rgb)
    elif image is not None:
        h.update(b"enc:")
        h.update(image)
    return h.digest()


def changed_fraction(previous: SessionState | None, hashes: np.ndarray) -> float:
    """Share of blocks whose hash differs from the previous frame's; 1.0 without a comparable one."""
    if previous is None or previous.grid != hashes.shape:
        return 1.0
    return float(np.count_nonzero(previous.hashes_array() != hashes)) / hashes.size


def frame_key(tenant: str, content_digest: bytes, settings: tuple, resized_size: tuple[int, int]) -> tuple:
    """The engine's cache key of one frame (vision features and prompt prefix); one engine = one model.

    The same pixels pruned the same way give the same kept blocks, so the same features and
    prefix. The content digest is exact (blake2b of the bytes as sent) because the caches are
    shared across sessions; the tenant keeps them apart across tenants. The caches live in the
    engine (`--vision-cache-size` entries, `--prefix-cache-bytes` bytes)."""
    return (tenant, bytes(content_digest), tuple(settings), tuple(resized_size))


class Grounder:
    """Runs GroundQuery -> GroundAnswer against one engine (through its loop) and session store."""

    def __init__(self, engine, store: SessionStore, loop, metrics: ServiceMetrics, max_image_pixels: int,
                 admission: Admission):
        self.engine, self.store, self.loop = engine, store, loop  # loop: pixelprune.model.loop.EngineLoop
        self.metrics = metrics
        self.max_image_pixels = max_image_pixels
        self.admission = admission  # the engine's waiting line is one of its budgets

    def validate(self, query: GroundQuery) -> None:
        """ValueError (-> INVALID_ARGUMENT) for a bad session id. The instruction was checked at the
        edge, before the image was admitted (service/admission.py InstructionLimits)."""
        if query.session_id and not SESSION_ID.fullmatch(query.session_id):
            raise ValueError("session_id must be 1..128 characters of [A-Za-z0-9._:-]")

    def ground(self, query: GroundQuery, deadline: float | None = None, is_active: Callable[[], bool] = lambda: True,
               wait_while: Callable[[], bool] | None = None) -> GroundAnswer:
        """Answer one query. `deadline` is a time.monotonic() value; ValueError for bad input.

        A full model queue raises QueueFull at once, or, with `wait_while`, once it turns False."""
        arrival = time.monotonic()
        self.validate(query)
        settings, key = query.pruning, query.pruning.key
        src = source_digest(query.image)
        previous = self.store.get(query.session_key) if query.session_id else None
        if self._same_request(previous, query.instruction, key) and previous.source_digest == src:
            return self._from_session(query, previous, src, arrival, decode_s=0.0)
        t0 = time.monotonic()
        pixels = decode_image(query.image, self.max_image_pixels, is_active)
        decode_s = time.monotonic() - t0
        prepared = self.engine.prepare(pixels, settings)
        del pixels  # the decoded screenshot: freed before waiting for the model (prepared holds the resized one)
        # Block hashes serve only the session (compare, save): without one, no pass over the pixels.
        hashes = block_hashes(prepared.pixels) if query.session_id else None
        changed = 1.0 if hashes is None else changed_fraction(previous, hashes)
        if previous is not None:
            self.metrics.record_changed_fraction(changed)
        same_blocks = changed == 0.0 and previous.original_size == prepared.original_size
        if same_blocks and self._same_request(previous, query.instruction, key):
            return self._from_session(query, previous, src, arrival, decode_s)
        # Vision features are keyed by exact bytes; within a session, a frame whose blocks all
        # equal the previous frame's (e.g. re-encoded) uses the previous frame's key.
        content = previous.content_key if same_blocks and tuple(previous.settings) == key else src
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExpired("deadline expired before the model ran")
        request = GroundRequest(prepared=prepared, instruction=query.instruction,
                                cache_key=frame_key(query.tenant, content, key, prepared.resized_size))
        seq = self.engine.sequence(request, deadline, is_active)  # never fitting: INVALID_ARGUMENT, not queued
        output, queued = self._model_step(seq, is_active, wait_while)
        rows, cols, keep_bits = pack_keep(prepared.keep)
        answer = CachedAnswer(raw_text=output.raw_text, point=output.point, point_normalized=output.point_normalized,
                              kept_blocks=output.kept_blocks, total_blocks=output.total_blocks,
                              keep_shape=(rows, cols), keep_bits=keep_bits, answer_logprob=output.answer_logprob)
        if query.session_id:
            self.metrics.record_frame_cache(hit=False)
            self.store.put(query.session_key, SessionState(
                original_size=prepared.original_size, resized_size=prepared.resized_size,
                block_hashes=hashes.astype("<u8", copy=False).tobytes(), source_digest=src, content_key=content,
                instruction=query.instruction, settings=key, answer=answer))
        timings = replace(output.timings, decode=decode_s, queue=seq.admitted_at - queued).with_events(
            ("arrival", arrival), ("queued", queued))  # ttft: from the request's arrival
        stages = timings.stages()
        if output.vision_reused:
            del stages["vit"]
        self.metrics.record_stages(stages)
        self.metrics.record_model_run(output.kept_blocks, output.total_blocks, output.kv_cache_bytes, timings.ttft)
        self.metrics.record_decode(timings.decode_tokens, output.generated_tokens)
        if self.engine.batch_settings.prefix_cache_bytes:
            self.metrics.record_prefix_cache(output.prefix_reused, self.engine.prefix_cache_bytes)
        return self._answer(query, answer, changed=changed, cache_hit=False, vision_hit=output.vision_reused,
                            image_size=prepared.original_size, model_size=prepared.resized_size,
                            timings=timings, arrival=arrival, prefix_hit=output.prefix_reused,
                            kv_bytes=output.kv_cache_bytes)

    def _model_step(self, seq, is_active: Callable[[], bool], wait_while: Callable[[], bool] | None):
        """The engine's part: a place in its waiting line (streams wait while wanted, unary calls a bounded
        time), then the loop, batched with everyone else. Returns (GroundingOutput, the monotonic time the
        place was asked for). The vision and prefix caches are read in the engine, not
        here, so that of several requests queued on one new frame only the first runs the ViT."""
        asked = time.monotonic()
        kind = UNARY if wait_while is None else STREAM
        ticket = self.admission.queue_place(kind, wait_while or is_active)
        try:
            future = self.loop.submit(seq, on_start=self._started(ticket, asked))
            self.metrics.record_queue_depth(self.loop.waiting)
            seq = future.result()
        finally:
            ticket.release()
        return self._outcome(seq), asked

    def _started(self, ticket, asked: float) -> Callable:
        def started(waited: float | None) -> None:
            ticket.release()  # admitted (or ended before): the place goes to the next in line
            if waited is not None:
                self.metrics.record_queue_wait(time.monotonic() - asked)
        return started

    def _outcome(self, seq):
        """The output of an ended sequence, or the exception its end means for the caller."""
        if seq.status is Status.FINISHED:
            return self.engine.output(seq)
        if seq.status is Status.EXPIRED:
            raise DeadlineExpired("deadline expired before the answer was ready")
        if seq.status is Status.CANCELLED:
            raise Cancelled("request cancelled before its answer was ready")
        if isinstance(seq.error, ValueError):  # the input was validated before: this is a bug, not bad input
            raise RuntimeError(f"the engine failed on a validated request: {seq.error}") from seq.error
        raise seq.error

    @staticmethod
    def _same_request(previous: SessionState | None, instruction: str, key: tuple) -> bool:
        return previous is not None and previous.instruction == instruction and tuple(previous.settings) == key

    def _from_session(self, query: GroundQuery, previous: SessionState, src: bytes, arrival: float,
                      decode_s: float) -> GroundAnswer:
        """A cache hit: the previous answer, no model; the session's TTL is refreshed."""
        self.metrics.record_frame_cache(hit=True)
        if previous.source_digest != src:
            previous = replace(previous, source_digest=src)
        else:  # the fast path: the changed fraction (0) was not recorded yet
            self.metrics.record_changed_fraction(0.0)
        self.store.put(query.session_key, previous)
        return self._answer(query, previous.answer, changed=0.0, cache_hit=True, vision_hit=False,
                            image_size=previous.original_size, model_size=previous.resized_size,
                            timings=Timings(decode=decode_s), arrival=arrival)

    def _answer(self, query: GroundQuery, answer: CachedAnswer, *, changed: float, cache_hit: bool,
                vision_hit: bool, image_size: tuple[int, int], model_size: tuple[int, int], timings: Timings,
                arrival: float, prefix_hit: bool = False, kv_bytes: int = 0) -> GroundAnswer:
        """The answer to `query` from a model run's or a session's CachedAnswer (keep mask included);
        `arrival` a time.monotonic() value."""
        timings = replace(timings, total=time.monotonic() - arrival)
        return GroundAnswer(
            found=answer.point is not None, point=answer.point, point_normalized=answer.point_normalized,
            raw_answer=answer.raw_text, kept_blocks=answer.kept_blocks, total_blocks=answer.total_blocks,
            changed_fraction=changed, cache_hit=cache_hit, vision_cache_hit=vision_hit,
            session_id=query.session_id, timings=timings, image_size=tuple(image_size),
            model_size=tuple(model_size), random_weights=bool(self.engine.is_random_weights), keep=answer.keep(),
            prefix_cache_hit=prefix_hit, kv_cache_bytes=int(kv_bytes), answer_logprob=answer.answer_logprob)
