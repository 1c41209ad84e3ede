"""The engine loop: one thread that owns a GroundingEngine and repeats schedule -> execute -> update.

    loop = EngineLoop(engine)
    future = loop.submit(engine.sequence(request, deadline, is_active), on_start=...)
    seq = future.result()          # the Sequence, ended: FINISHED (engine.output(seq)), FAILED,
                                   # CANCELLED (the caller went away) or EXPIRED (deadline)
    loop.call(fn)                  # fn() on the loop's thread once nothing runs (warm-up)
    loop.stop()

Submitters hand sequences to an inbox; the loop moves them into the scheduler at the top
of each iteration, so only this thread ever touches the scheduler and the runner.
Deadlines and cancellations are the scheduler's (it asks each sequence's `is_active`);
`on_start(seconds waited)` runs when a sequence is admitted. The loop reports every step
to `on_step` and keeps the time of its last progress, so a watchdog can tell a wedged
engine from an idle one (`stalled`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from pixelprune.model.step import Sequence, Status

log = logging.getLogger(__name__)


class LoopStopped(RuntimeError):
    """The engine loop has stopped: nothing more is accepted or run."""


class EngineLoop:
    """See the module docstring."""

    def __init__(self, engine, on_step: Callable | None = None, name: str = "pixelprune-engine"):
        self.engine = engine
        self._on_step = on_step
        self._cond = threading.Condition()
        self._inbox: deque[tuple[Sequence, Future, Callable | None]] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._pending: dict[int, tuple[Future, Callable | None, float]] = {}  # seq id -> (future, on_start, submitted)
        self._stopping = False
        self.last_progress = time.monotonic()  # the last time the loop admitted, ran or ended anything
        self.cancelled = 0  # sequences that ended CANCELLED or EXPIRED
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        engine.attach(self)  # RuntimeError when another live loop drives it
        self._thread.start()

    # ------------------------------------------------------------------ submitters' side
    def submit(self, seq: Sequence, on_start: Callable[[float], None] | None = None) -> Future:
        """Queue a sequence; the future resolves to it once it has ended (whatever the way)."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise LoopStopped("server is shutting down")
            self._inbox.append((seq, future, on_start))
            self._cond.notify_all()
        return future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn() on the loop's thread once nothing is running; the future carries its result or exception."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise LoopStopped("server is shutting down")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    @property
    def waiting(self) -> int:
        """Sequences submitted and not admitted yet."""
        return len(self._inbox) + len(self.engine.scheduler.waiting)

    @property
    def running(self) -> int:
        """Sequences admitted and not ended."""
        return sum(not s.done for s in list(self.engine.scheduler.running))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled(self, bound_s: float, now: float | None = None) -> str | None:
        """Why the engine cannot make progress, or None: its thread is gone, or work is waiting or
        running and nothing was admitted, run or ended for `bound_s` seconds."""
        if not self.alive and not self._stopping:
            return "engine_loop_dead"
        now = time.monotonic() if now is None else now
        if (self.waiting or self.running) and now - self.last_progress > bound_s:
            return "engine_no_progress"
        return None

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what was accepted, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop's thread
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException as exc:  # noqa: BLE001 - a bug in the loop: fail what is left, say so, end
            log.exception("the engine loop failed")
            self._fail_all(exc)
            raise
        finally:
            self.engine.detach(self)
        self._fail_all(LoopStopped("server is shutting down"))

    def _iterate(self) -> bool:
        with self._cond:
            while not self._inbox and not self._calls and self.engine.idle:
                if self._stopping:
                    return False
                self._cond.wait()
            new = list(self._inbox)
            self._inbox.clear()
        for seq, future, on_start in new:
            self._pending[seq.id] = (future, on_start, time.monotonic())
            self.engine.add(seq)
        if self._calls and self.engine.idle:
            self._run_call(*self._calls.popleft())
            return True
        try:
            ended = self.engine.step(on_step=self._on_step)
        except Exception as exc:  # noqa: BLE001 - a bug in a step: what was in flight fails, the loop lives
            log.exception("an engine step failed; the requests in flight fail with it")
            ended = self.engine.abort_all(exc)
        self._account(ended)
        return True

    def _run_call(self, fn: Callable[[], Any], future: Future) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
        self.last_progress = time.monotonic()

    def _account(self, ended: list[Sequence]) -> None:
        """Starts (sequences now running), progress, and the futures of the ended."""
        now = time.monotonic()
        progressed = bool(ended)
        for seq in self.engine.scheduler.running:
            entry = self._pending.get(seq.id)
            if entry is not None and entry[1] is not None and seq.admitted_at is not None:
                on_start, waited = entry[1], seq.admitted_at - entry[2]
                self._pending[seq.id] = (entry[0], None, entry[2])
                progressed = True
                self._started(on_start, waited)
        for seq in ended:
            future, on_start, _ = self._pending.pop(seq.id, (None, None, 0.0))
            if on_start is not None:  # ended before it ran (expired, cancelled, never fitting)
                self._started(on_start, None)
            if seq.status in (Status.CANCELLED, Status.EXPIRED):
                self.cancelled += 1
            if future is not None:
                future.set_result(seq)
        if progressed or self.engine.scheduler.running:
            self.last_progress = now

    @staticmethod
    def _started(on_start: Callable, waited: float | None) -> None:
        try:
            on_start(waited)
        except Exception:  # noqa: BLE001 - a caller's callback never stops the loop
            log.exception("an on_start callback failed")

    def _fail_all(self, error: BaseException) -> None:
        """End everything still waiting, running or queued with `error` (the loop is over)."""
        with self._cond:
            self._stopping = True
            new, self._inbox = list(self._inbox), deque()
            calls, self._calls = list(self._calls), deque()
        for seq, future, on_start in new:
            self._pending[seq.id] = (future, on_start, time.monotonic())
            seq.status, seq.error = Status.FAILED, error
        for seq in self.engine.scheduler.cancel_all(error) + [s for s, _, _ in new]:
            future, on_start, _ = self._pending.pop(seq.id, (None, None, 0.0))
            if on_start is not None:
                self._started(on_start, None)
            if future is not None and not future.done():
                future.set_result(seq)
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
