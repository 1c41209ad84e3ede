"""GroundStream's newest-frame slot and its idle clock.

A stream runs two threads (service/servicer.py): a reader that consumes frames as
fast as the client sends them and puts each into this slot, where it replaces an
unanswered older one, and the RPC's own thread, which takes the newest frame,
answers it, and reports how many frames were skipped in between. Frames still
unanswered when the stream ends (an error, the server stopping) are counted by
`abandon()`; the servicer sends that count in the trailing metadata key
SKIPPED_FRAMES_KEY.

Idle streams: while the slot is empty and no frame of the stream is being
answered, the stream may stay silent for at most `idle_timeout_s`; then `take`
raises StreamIdle (DEADLINE_EXCEEDED), which ends the call and frees its thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from service.errors import StreamIdle

SKIPPED_FRAMES_KEY = "pixelprune-skipped-frames"  # trailing metadata: frames left unanswered at the end


@dataclass(frozen=True)
class Pending:
    query: object  # the frame as a GroundQuery, with the instruction and settings in force when it arrived
    sequence: int  # the client's frame counter
    arrival: float  # time.perf_counter() when the reader received the frame


class NewestFrame:
    """A one-slot mailbox: put() replaces an unanswered frame (counted as skipped); take() blocks."""

    def __init__(self, idle_timeout_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self._cond = threading.Condition()
        self._pending: Pending | None = None
        self._skipped = 0
        self._closed = False
        self._idle_timeout_s, self._clock = idle_timeout_s, clock
        self._last_activity = clock()
        self.error: Exception | None = None  # a bad frame: ends the stream with its status

    def put(self, item: Pending) -> None:
        with self._cond:
            if self._pending is not None:
                self._skipped += 1
            self._pending = item
            self._last_activity = self._clock()
            self._cond.notify()

    def close(self, error: Exception | None = None) -> None:
        with self._cond:
            self._closed = True
            self.error = self.error or error
            self._cond.notify()

    def answered(self) -> None:
        """The frame taken last has been answered: the idle clock starts again from now."""
        with self._cond:
            self._last_activity = self._clock()

    def _wait(self) -> None:
        if self._idle_timeout_s <= 0:
            self._cond.wait()
            return
        remaining = self._last_activity + self._idle_timeout_s - self._clock()
        if remaining <= 0:
            raise StreamIdle(f"stream closed: no frame for {self._idle_timeout_s:g} s (--stream-idle-timeout-s)")
        self._cond.wait(remaining)

    def take(self) -> tuple[Pending, int] | None:
        """The newest frame and the frames skipped before it; None when the stream is over."""
        with self._cond:
            while self._pending is None and not self._closed:
                self._wait()
            if self.error is not None or self._pending is None:
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
