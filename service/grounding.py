"""The service's domain function: one screenshot + instruction -> one answer, with session reuse.

    source digest -> session lookup -> (same bytes, instruction, settings: answer from the session)
    -> decode -> prepare (resize, select, patchify) -> block hashes
    -> changed fraction vs the previous frame -> (all blocks equal, same instruction and settings:
       answer from the session, as ARCHITECTURE.md prescribes; a hash collision could only
       mislead the client's own session, with probability ~2**-64 per changed block)
    -> on the model worker: vision cache (same pixels and settings: skip the ViT) -> engine.ground
    -> save the session -> GroundAnswer

Everything before the model step runs on the calling RPC thread, so the single
model worker only ever runs the model. The vision cache is shared by all sessions,
so its key is exact: a cryptographic digest of the request's image bytes (never
the 64-bit block hashes). No gRPC types here: the servicer converts.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from pixelprune.hashing import block_hashes
from pixelprune.settings import PruneSettings
from service.cache import LRUCache, vision_key
from service.errors import DeadlineExpired
from service.images import RawImage, decode_image
from service.metrics import ServiceMetrics
from service.sessions import CachedAnswer, SessionState, SessionStore, session_key
from service.worker import ModelWorker

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
    timings_ms: dict  # decode, resize, select, patchify, vit, prefill, ttft, decode_tokens, queue, total (ms)
    image_size: tuple[int, int]  # (W, H) as sent
    model_size: tuple[int, int]  # (w, h) after smart_resize
    random_weights: bool  # the model has random weights: the answer means nothing

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


def kv_bytes_per_token(engine) -> int:
    """Key+value bytes one prompt token takes in the LLM's cache, from the model config (0 if unknown)."""
    config = getattr(getattr(getattr(engine, "model", None), "config", None), "text_config", None)
    try:
        dtype_bytes = int(getattr(engine, "dtype").itemsize)
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes
    except (AttributeError, TypeError):
        return 0


class Grounder:
    """Runs GroundQuery -> GroundAnswer against one engine, session store, vision cache and worker."""

    def __init__(self, engine, store: SessionStore, vision_cache: LRUCache, worker: ModelWorker,
                 metrics: ServiceMetrics, max_image_pixels: int, max_instruction_chars: int):
        self.engine, self.store, self.vision_cache, self.worker = engine, store, vision_cache, worker
        self.metrics = metrics
        self.max_image_pixels, self.max_instruction_chars = max_image_pixels, max_instruction_chars
        self._kv_per_token = kv_bytes_per_token(engine)
        self._prompt_text_tokens = 0  # text tokens of the last prompt (calibrates the in-use estimate)

    def validate(self, query: GroundQuery) -> None:
        """ValueError (-> INVALID_ARGUMENT) for a bad instruction or session id."""
        if not query.instruction or not query.instruction.strip():
            raise ValueError("instruction is empty")
        if len(query.instruction) > self.max_instruction_chars:
            raise ValueError(f"instruction has {len(query.instruction)} characters, more than "
                             f"{self.max_instruction_chars}")
        if query.session_id and not SESSION_ID.fullmatch(query.session_id):
            raise ValueError("session_id must be 1..128 characters of [A-Za-z0-9._:-]")

    def ground(self, query: GroundQuery, deadline: float | None = None, is_active: Callable[[], bool] = lambda: True,
               wait_while: Callable[[], bool] | None = None) -> GroundAnswer:
        """Answer one query. `deadline` is a time.monotonic() value; ValueError for bad input.

        A full model queue raises QueueFull at once, or, with `wait_while`, once it turns False."""
        arrival = time.perf_counter()
        self.validate(query)
        settings, key = query.pruning, query.pruning.key
        src = source_digest(query.image)
        previous = self.store.get(query.session_key) if query.session_id else None
        if self._same_request(previous, query.instruction, key) and previous.source_digest == src:
            return self._from_session(query, previous, src, arrival, decode_s=0.0)
        t0 = time.perf_counter()
        pixels = decode_image(query.image, self.max_image_pixels)
        decode_s = time.perf_counter() - t0
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
        vkey = vision_key(content, key, prepared.resized_size) + (query.tenant,)  # no probing across tenants
        job = self.worker.run(lambda: self._model_step(prepared, query.instruction, vkey),
                              deadline=deadline, is_active=is_active, wait_while=wait_while)
        output, started = job.value
        answer = CachedAnswer(raw_text=output.raw_text, point=output.point, point_normalized=output.point_normalized,
                              kept_blocks=output.kept_blocks, total_blocks=output.total_blocks)
        if query.session_id:
            self.metrics.record_frame_cache(hit=False)
            self.store.put(query.session_key, SessionState(
                original_size=prepared.original_size, resized_size=prepared.resized_size,
                block_hashes=hashes.astype("<u8", copy=False).tobytes(), source_digest=src, content_key=content,
                instruction=query.instruction, settings=key, answer=answer))
        prep_s = sum(prepared.timings.values())
        ttft_s = (started - arrival) + output.timings["ttft"] - prep_s
        timings = {**output.timings, "decode": decode_s, "queue": job.queue_wait_s, "ttft": ttft_s}
        self.metrics.record_stages({k: v for k, v in timings.items() if k != "vit" or not output.vision_reused})
        self.metrics.record_model_run(output.kept_blocks, output.total_blocks, output.kv_cache_bytes, ttft_s)
        return self._answer(query, answer, changed, False, output.vision_reused, prepared.original_size,
                            prepared.resized_size, timings, arrival)

    def _model_step(self, prepared, instruction: str, vkey: tuple):
        """Runs on the model worker: the engine's ViT (unless cached), prefill and decoding.

        The vision cache is read here, not on the RPC thread, so that of several requests
        queued on one new frame only the first runs the ViT."""
        started = time.perf_counter()
        vision = self.vision_cache.get(vkey)
        estimate = self._kv_per_token * (prepared.kept_blocks + self._prompt_text_tokens)
        self.metrics.set_kv_in_use(estimate)
        try:
            output = self.engine.ground(prepared, instruction, vision=vision)
        except ValueError as exc:  # the input was validated before: this is a bug, not bad input
            raise RuntimeError(f"engine.ground failed: {exc}") from exc
        finally:
            self.metrics.set_kv_in_use(0)
        if vision is None:
            self.vision_cache.put(vkey, output.vision)
        if self._kv_per_token:
            self._prompt_text_tokens = max(0, output.kv_cache_bytes // self._kv_per_token - output.kept_blocks)
        return output, started

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
        return self._answer(query, previous.answer, 0.0, True, False, previous.original_size,
                            previous.resized_size, {"decode": decode_s}, arrival)

    def _answer(self, query, answer: CachedAnswer, changed: float, cache_hit: bool, vision_hit: bool,
                image_size, model_size, timings: dict, arrival: float) -> GroundAnswer:
        stages = ("decode", "resize", "select", "patchify", "vit", "prefill", "ttft", "decode_tokens", "queue")
        timings_ms = {name: 1000.0 * timings.get(name, 0.0) for name in stages}
        timings_ms["total"] = 1000.0 * (time.perf_counter() - arrival)
        return GroundAnswer(
            found=answer.point is not None, point=answer.point, point_normalized=answer.point_normalized,
            raw_answer=answer.raw_text, kept_blocks=answer.kept_blocks, total_blocks=answer.total_blocks,
            changed_fraction=changed, cache_hit=cache_hit, vision_cache_hit=vision_hit,
            session_id=query.session_id, timings_ms=timings_ms, image_size=tuple(image_size),
            model_size=tuple(model_size), random_weights=bool(self.engine.is_random_weights))
