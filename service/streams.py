"""GroundStream's newest-frame slot, its clocks, and the open streams of one server.

A stream runs two threads (service/servicer.py): a reader that consumes frames as
fast as the client sends them and puts each into this slot, where it replaces an
unanswered older one, and the RPC's own thread, which takes the newest frame,
answers it, and reports how many frames were skipped in between. Frames still
unanswered when the stream ends (an error, the server draining or stopping) are
counted by `abandon()`; the servicer sends that count in the trailing metadata
key SKIPPED_FRAMES_KEY.

Clocks: a stream must send its first frame within `first_frame_timeout_s` (0: the
idle timeout applies from the start); after that, while the slot is empty and no
frame of the stream is being answered, it may stay silent for at most
`idle_timeout_s`; then `take` raises StreamIdle
(DEADLINE_EXCEEDED), which ends the call and frees its thread. The idle clock also
runs while an answer waits to be *sent* (a client that stops reading fills its
HTTP/2 window and gRPC's send blocks the RPC's thread): the registry's watchdog
cancels a stream whose send has been blocked for `idle_timeout_s`.

Open streams (`StreamRegistry`): at most `max_open` at a time, below the server's
RPC limit, so streams can never take the slots unary calls need; at most
`per_tenant` per tenant (with auth) or `per_peer` per peer address (without).
A stream over a limit is refused at once with RESOURCE_EXHAUSTED. On drain, each
open stream ends with OK after the frame it is answering (`drain()`).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from service.errors import QueueFull, StreamIdle
from service.health import Periodic

log = logging.getLogger(__name__)
SKIPPED_FRAMES_KEY = "pixelprune-skipped-frames"  # trailing metadata: frames left unanswered at the end
WATCHDOG_MAX_PERIOD_S = 1.0  # the send watchdog looks at least this often (more often for short timeouts)


@dataclass(frozen=True)
class Pending:
    query: object  # the frame as a GroundQuery, with the instruction and settings in force when it arrived
    sequence: int  # the client's frame counter
    arrival: float  # time.perf_counter() when the reader received the frame


class NewestFrame:
    """A one-slot mailbox: put() replaces an unanswered frame (counted as skipped); take() blocks."""

    def __init__(self, idle_timeout_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 first_frame_timeout_s: float = 0.0):
        self._cond = threading.Condition()
        self._pending: Pending | None = None
        self._skipped = 0
        self._closed = False
        self._ended = False  # end(): take() answers nothing more, even a pending frame
        self._received = False  # a frame has arrived (the first-frame clock is over)
        self._idle_timeout_s, self._first_frame_timeout_s, self._clock = idle_timeout_s, first_frame_timeout_s, clock
        self._last_activity = clock()
        self.error: Exception | None = None  # a bad frame: ends the stream with its status
        self.timed_out: str | None = None  # "first_frame" or "idle" once take() raised StreamIdle

    def put(self, item: Pending) -> None:
        with self._cond:
            if self._pending is not None:
                self._skipped += 1
            self._pending, self._received = item, True
            self._last_activity = self._clock()
            self._cond.notify()

    def close(self, error: Exception | None = None) -> None:
        """No more frames will come (a frame still pending is answered)."""
        with self._cond:
            self._closed = True
            self.error = self.error or error
            self._cond.notify()

    def end(self) -> None:
        """The stream ends after the frame being answered: take() returns None from now on."""
        with self._cond:
            self._closed = self._ended = True
            self._cond.notify()

    def answered(self) -> None:
        """The frame taken last has been answered: the idle clock starts again from now."""
        with self._cond:
            self._last_activity = self._clock()

    def _wait(self) -> None:
        first = not self._received and self._first_frame_timeout_s > 0  # 0: the idle clock from the start
        timeout = self._first_frame_timeout_s if first else self._idle_timeout_s
        if timeout <= 0:
            self._cond.wait()
            return
        remaining = self._last_activity + timeout - self._clock()
        if remaining <= 0:
            self.timed_out = "first_frame" if first else "idle"
            if first:
                raise StreamIdle(f"stream closed: no first frame within {timeout:g} s "
                                 f"(--stream-first-frame-timeout-s)")
            raise StreamIdle(f"stream closed: no frame for {timeout:g} s (--stream-idle-timeout-s)")
        self._cond.wait(remaining)

    def take(self) -> tuple[Pending, int] | None:
        """The newest frame and the frames skipped before it; None when the stream is over."""
        with self._cond:
            while self._pending is None and not self._closed:
                self._wait()
            if self.error is not None or self._ended or self._pending is None:
                return None
            item, skipped = self._pending, self._skipped
            self._pending, self._skipped = None, 0
            return item, skipped

    def abandon(self) -> int:
        """Close the slot; the frames received and never answered nor reported (pending + skipped)."""
        with self._cond:
            self._closed = True
            dropped = self._skipped + (self._pending is not None)
            self._pending, self._skipped = None, 0
            return dropped


@dataclass(frozen=True)
class StreamLimits:
    max_open: int = 0  # open streams of the server (0 = no limit; the config keeps it below the RPC limit)
    per_tenant: int = 0  # open streams of one tenant, with auth (0 = no limit)
    per_peer: int = 0  # open streams of one peer address, without auth (0 = no limit)
    idle_timeout_s: float = 0.0  # silence, or a blocked send, allowed after the first frame (0 = forever)
    first_frame_timeout_s: float = 0.0  # time allowed before the first frame (0 = the idle timeout)


def peer_address(peer: str) -> str:
    """gRPC's peer string without the client's port ("ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"),
    so that one host's connections count together; other kinds (unix:...) as they are."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


@dataclass(eq=False)
class OpenStream:
    """One open stream as the registry sees it (compared by identity)."""
    slot: NewestFrame  # its newest-frame slot
    key: tuple[str, str]  # ("tenant", name) or ("peer", address): what its per-client limit counts
    cancel: Callable[[], None]  # ends the RPC from another thread (grpc's context.cancel)
    sending_since: float | None = None  # clock() when the answer now being sent was handed to gRPC
    closed_for: str | None = None  # why the server closed it ("send_timeout", "drain"), if it did
    clock: Callable[[], float] = time.monotonic  # the registry's clock
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def sending(self) -> Iterator[None]:
        """Around the `yield` of an answer: gRPC's send blocks there while the client does not read."""
        with self._lock:
            self.sending_since = self.clock()
        try:
            yield
        finally:
            with self._lock:
                self.sending_since = None


class StreamRegistry:
    """The open streams of one server: the limits on opening one, the send watchdog, and drain."""

    def __init__(self, limits: StreamLimits, clock: Callable[[], float] = time.monotonic,
                 on_refused: Callable[[str], None] | None = None,
                 on_closed: Callable[[str], None] | None = None):
        self.limits, self._clock = limits, clock
        self._streams: set[OpenStream] = set()
        self._per_key: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._on_refused = on_refused or (lambda limit: None)
        self._on_closed = on_closed or (lambda reason: None)
        self.draining = False  # drain() was called: streams end after their current frame
        self._watchdog: Periodic | None = None

    @property
    def open_count(self) -> int:
        return len(self._streams)

    def _refusal(self, key: tuple[str, str]) -> str | None:
        """The limit a new stream of `key` would exceed ("open", "tenant", "peer"), or None."""
        if self.limits.max_open and len(self._streams) >= self.limits.max_open:
            return "open"
        limit = self.limits.per_tenant if key[0] == "tenant" else self.limits.per_peer
        if limit and self._per_key.get(key, 0) >= limit:
            return key[0]
        return None

    def open(self, tenant: str, peer: str, cancel: Callable[[], None]) -> OpenStream:
        """Register a new stream, or raise QueueFull (RESOURCE_EXHAUSTED) when it is over a limit."""
        key = ("tenant", tenant) if tenant else ("peer", peer_address(peer))
        slot = NewestFrame(self.limits.idle_timeout_s, self._clock, self.limits.first_frame_timeout_s)
        with self._lock:
            refused = self._refusal(key)
            if refused is None:
                stream = OpenStream(slot=slot, key=key, cancel=cancel, clock=self._clock)
                self._streams.add(stream)
                self._per_key[key] = self._per_key.get(key, 0) + 1
        if refused is not None:
            self._on_refused(refused)
            raise QueueFull(self._refusal_message(refused, key))
        if self.draining:
            stream.slot.end()
        return stream

    def _refusal_message(self, refused: str, key: tuple[str, str]) -> str:
        if refused == "open":
            return (f"server busy: {self.limits.max_open} streams already open (--max-open-streams); "
                    f"retry later or elsewhere")
        limit, flag = ((self.limits.per_tenant, "--max-streams-per-tenant") if refused == "tenant"
                       else (self.limits.per_peer, "--max-streams-per-peer"))
        return f"too many open streams: {limit} of this {refused} already open ({flag}); close one first"

    def close(self, stream: OpenStream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.discard(stream)
                self._per_key[stream.key] -= 1
                if not self._per_key[stream.key]:
                    del self._per_key[stream.key]

    def sweep(self) -> int:
        """Cancel every stream whose answer has waited to be sent for longer than the idle timeout;
        how many were cancelled now. The client sees CANCELLED (its window is full: a status with a
        message could not reach it before the answer it does not read)."""
        timeout = self.limits.idle_timeout_s
        if timeout <= 0:
            return 0
        now = self._clock()
        with self._lock:
            stuck = [(s, now - since) for s in self._streams  # sending_since read once: its thread may clear it
                     if s.closed_for is None and (since := s.sending_since) is not None and now - since > timeout]
            for stream, _ in stuck:
                stream.closed_for = "send_timeout"
        for stream, blocked_s in stuck:
            log.warning("stream of %s %s closed: its answer could not be sent for %.1f s (the client does not "
                        "read; --stream-idle-timeout-s %g)", stream.key[0], stream.key[1], blocked_s, timeout)
            self._on_closed("send_timeout")
            stream.cancel()
        return len(stuck)

    def drain(self) -> int:
        """Every open stream ends after the frame it is answering (OK, with its skipped-frames
        trailer); streams opened from now on end at once. How many streams were open."""
        with self._lock:
            self.draining = True
            streams = list(self._streams)
        for stream in streams:
            stream.closed_for = stream.closed_for or "drain"
            self._on_closed("drain")
            stream.slot.end()
        return len(streams)

    def start(self) -> None:
        """Start the send watchdog (a daemon thread; nothing to do without an idle timeout)."""
        if self.limits.idle_timeout_s <= 0 or self._watchdog is not None:
            return
        period = min(WATCHDOG_MAX_PERIOD_S, self.limits.idle_timeout_s / 4)
        self._watchdog = Periodic(self.sweep, period, "pixelprune-stream-watchdog", "stream watchdog: sweep").start()

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop(timeout=5)
