"""Per-session memory of the previous frame: in Redis (any replica serves any session) or in process.

A session holds the previous frame's geometry, its per-block hashes (packed
little-endian uint64), digests of its bytes, the instruction and pruning settings used,
and the answer with the keep mask of the model run (packed bits, pixelprune.keepmask;
absent in sessions stored before it was added, which still load; a server without it
reads a session with it as no session). Both stores have the same two methods,
`get` and `put`, and neither raises on a storage failure: Redis errors are counted through a
callback and the request goes on without reuse. After a failure the Redis
store skips Redis for a short back-off, so an outage costs one socket timeout
per back-off period instead of one per request; the redis-py client reconnects
on its own once the server is back.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import numpy as np

from pixelprune.keepmask import unpack_keep

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1  # bump when the packed layout changes; other versions read as "no session"
_HEADER = struct.Struct("<BI")  # version, length of the JSON meta


@dataclass(frozen=True)
class CachedAnswer:
    raw_text: str  # the model's answer
    point: tuple[float, float] | None  # in the original screenshot's pixels
    point_normalized: tuple[float, float] | None  # in [0, 1] of width and height
    kept_blocks: int  # visual tokens the model saw
    total_blocks: int  # visual tokens of the full image
    keep_shape: tuple[int, int] | None = None  # (rows, cols) of 32x32 blocks of keep_bits; None = not stored
    keep_bits: bytes | None = None  # the blocks the model saw, pixelprune.keepmask.pack_keep's bits
    answer_logprob: float = 0.0  # sum of the answer tokens' log-probabilities (0 in sessions stored before it)

    def keep(self) -> np.ndarray | None:
        """The keep mask as bool (rows, cols), or None for an answer stored without one."""
        return None if self.keep_bits is None else unpack_keep(*self.keep_shape, self.keep_bits)


@dataclass(frozen=True)
class SessionState:
    original_size: tuple[int, int]  # (W, H) of the screenshot as sent, pixels
    resized_size: tuple[int, int]  # (w, h) after smart_resize, pixels
    block_hashes: bytes  # (h/32)*(w/32) little-endian uint64 block hashes, raster order
    source_digest: bytes  # identity of the last request's image bytes (fast path: no decode)
    content_key: bytes  # vision-cache key of this content: the source digest of the first of
    #                     this session's run of frames with these block hashes
    instruction: str  # the instruction answered
    settings: tuple  # pruning settings key: (enabled, method, metric, tau)
    answer: CachedAnswer  # what was answered

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of 32x32 blocks."""
        return self.resized_size[1] // 32, self.resized_size[0] // 32

    def hashes_array(self) -> np.ndarray:
        return np.frombuffer(self.block_hashes, dtype="<u8").reshape(self.grid)


def pack_state(state: SessionState) -> bytes:
    """SessionState -> compact bytes: header, JSON meta, digests, raw hashes, keep bits (if any)."""
    meta = asdict(state)
    for key in ("block_hashes", "content_key", "source_digest"):
        meta[key] = len(meta[key])  # lengths only; the bytes follow the JSON
    keep_bits = state.answer.keep_bits
    if keep_bits is None:  # the layout of sessions stored before keep masks
        del meta["answer"]["keep_bits"], meta["answer"]["keep_shape"]
    else:
        meta["answer"]["keep_bits"] = len(keep_bits)
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    return b"".join([_HEADER.pack(_FORMAT_VERSION, len(meta_bytes)), meta_bytes,
                     state.content_key, state.source_digest, state.block_hashes, keep_bits or b""])


def unpack_state(blob: bytes) -> SessionState | None:
    """Inverse of pack_state; None for another version or a damaged value."""
    try:
        version, meta_len = _HEADER.unpack_from(blob)
        if version != _FORMAT_VERSION:
            return None
        pos = _HEADER.size
        meta = json.loads(blob[pos:pos + meta_len])
        pos += meta_len
        parts = {}
        for key in ("content_key", "source_digest", "block_hashes"):
            parts[key] = bytes(blob[pos:pos + meta[key]])
            pos += meta[key]
        ans = meta["answer"]
        keep_bits = None if ans.get("keep_bits") is None else bytes(blob[pos:pos + ans["keep_bits"]])
        pos += 0 if keep_bits is None else len(keep_bits)
        if pos != len(blob):
            return None
        resized_w, resized_h = meta["resized_size"]
        grid = (resized_h // 32, resized_w // 32)
        if len(parts["block_hashes"]) != 8 * grid[0] * grid[1]:
            return None  # hashes that do not fit the geometry would fail every frame of the session
        if keep_bits is not None:
            if tuple(ans["keep_shape"]) != grid:
                return None
            unpack_keep(*grid, keep_bits)  # ValueError for bad bits: a damaged value
        answer = CachedAnswer(raw_text=ans["raw_text"],
                              point=tuple(ans["point"]) if ans["point"] is not None else None,
                              point_normalized=tuple(ans["point_normalized"]) if ans["point_normalized"] else None,
                              kept_blocks=int(ans["kept_blocks"]), total_blocks=int(ans["total_blocks"]),
                              keep_shape=None if keep_bits is None else grid, keep_bits=keep_bits,
                              answer_logprob=float(ans.get("answer_logprob", 0.0)))
        return SessionState(original_size=tuple(meta["original_size"]), resized_size=tuple(meta["resized_size"]),
                            instruction=meta["instruction"], settings=tuple(meta["settings"]), answer=answer,
                            **parts)
    except (struct.error, ValueError, KeyError, TypeError):
        return None


def session_key(tenant: str, session_id: str) -> str:
    """A session's key in a store: `tenant/session_id` (neither may contain "/"), or the bare
    session id without auth, so one tenant can neither read nor overwrite another's sessions."""
    return f"{tenant}/{session_id}" if tenant else session_id


class SessionStore(Protocol):
    """Where sessions live. Neither method raises for storage failures."""

    def get(self, session_id: str) -> SessionState | None: ...

    def put(self, session_id: str, state: SessionState) -> None: ...


class InProcessSessionStore:
    """Sessions in this process's memory (the default without Redis): TTL, LRU-bounded, thread-safe."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic, max_sessions: int = 10_000):
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError("ttl_s must be > 0 and max_sessions >= 1")
        self._ttl_s, self._clock, self._max = ttl_s, clock, max_sessions
        self._items: OrderedDict[str, tuple[float, SessionState]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SessionState | None:
        with self._lock:
            item = self._items.get(session_id)
            if item is None:
                return None
            if item[0] <= self._clock():
                del self._items[session_id]
                return None
            self._items.move_to_end(session_id)
            return item[1]

    def put(self, session_id: str, state: SessionState) -> None:
        with self._lock:
            now = self._clock()
            self._items[session_id] = (now + self._ttl_s, state)
            self._items.move_to_end(session_id)
            while len(self._items) > self._max:
                self._items.popitem(last=False)
            # Expired sessions at the old end go too, so ended streams do not pile up until
            # max_sessions (their block hashes are ~1 KB per 100 blocks).
            while self._items and next(iter(self._items.values()))[0] <= now:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class RedisSessionStore:
    """Sessions in Redis under `prefix + session_id`, with a TTL refreshed on every frame."""

    def __init__(self, client, ttl_s: float, prefix: str = "pixelprune:session:",
                 on_error: Callable[[], None] | None = None, backoff_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self._client, self._ttl_ms, self._prefix = client, max(1, int(ttl_s * 1000)), prefix
        self._on_error = on_error or (lambda: None)
        self._backoff_s, self._clock = backoff_s, clock
        self._retry_at = 0.0

    def _failed(self, op: str, exc: Exception) -> None:
        self._retry_at = self._clock() + self._backoff_s
        self._on_error()
        log.warning("redis %s failed (%s: %s); sessions unavailable for %.1f s", op, type(exc).__name__,
                    exc, self._backoff_s)

    def _available(self) -> bool:
        return self._clock() >= self._retry_at

    def get(self, session_id: str) -> SessionState | None:
        if not self._available():
            return None
        try:
            blob = self._client.get(self._prefix + session_id)
        except Exception as exc:  # noqa: BLE001 - any Redis/network failure degrades to "no session"
            self._failed("get", exc)
            return None
        if blob is None:
            return None
        state = unpack_state(blob)
        if state is None:
            log.warning("session %r holds an unreadable value; ignored", session_id)
        return state

    def put(self, session_id: str, state: SessionState) -> None:
        if not self._available():
            return
        try:
            self._client.set(self._prefix + session_id, pack_state(state), px=self._ttl_ms)
        except Exception as exc:  # noqa: BLE001
            self._failed("set", exc)


def redis_client(url: str, timeout_s: float = 0.25):
    """A redis-py client that fails fast and reconnects by itself (one retry on connection errors)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=30)
