"""One model worker thread per process, behind a bounded queue.

The model runs one request at a time (one GPU, one set of weights, no
re-entrancy in generate). RPC threads do their CPU preprocessing themselves and
hand the model step to `submit`, which refuses at once when the queue is full
(RESOURCE_EXHAUSTED: the client backs off) rather than letting latency grow
without bound. When the worker takes a job it first checks that the job is
still wanted: a job whose deadline passed while queued, or whose RPC was
cancelled, is not run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from service.errors import Cancelled, DeadlineExpired, QueueFull

log = logging.getLogger(__name__)
WAIT_POLL_S = 0.05  # how often a submitter waiting for room re-checks whether it still wants to wait


@dataclass
class _Job:
    fn: Callable[[], Any]  # the model step
    deadline: float | None  # time.monotonic() after which the result is useless; None = none
    is_active: Callable[[], bool]  # False once the RPC is cancelled
    enqueued: float = field(default_factory=time.monotonic)  # monotonic seconds
    future: Future = field(default_factory=Future)  # carries the result or the exception


@dataclass(frozen=True)
class JobResult:
    value: Any  # what fn returned
    queue_wait_s: float  # seconds between submit and the worker taking the job


class ModelWorker:
    """A single thread running submitted model steps in order."""

    def __init__(self, queue_size: int, on_depth: Callable[[int], None] | None = None,
                 on_wait: Callable[[float], None] | None = None, name: str = "pixelprune-model"):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._on_depth = on_depth or (lambda depth: None)
        self._on_wait = on_wait or (lambda seconds: None)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._stopping = False
        self._closed = False  # the worker thread has ended: nothing queued will run any more
        self.skipped = 0  # jobs not run: deadline passed or RPC cancelled
        self.waiting = 0  # submitters waiting for room (streams; see submit's wait_while)
        self._waiting_lock = threading.Lock()
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._queue.qsize()

    def submit(self, fn: Callable[[], Any], deadline: float | None = None,
               is_active: Callable[[], bool] = lambda: True,
               wait_while: Callable[[], bool] | None = None) -> Future:
        """Queue fn; its Future resolves to a JobResult.

        With no room: QueueFull at once, or, given `wait_while`, wait for room for as long as
        wait_while() stays True (polled every WAIT_POLL_S), then QueueFull."""
        job = _Job(fn=fn, deadline=deadline, is_active=is_active)
        if self._stopping:
            raise QueueFull("server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            if wait_while is None:
                raise QueueFull(f"server busy: {self._queue.maxsize} requests already wait for the model") from None
            self._wait_for_room(job, wait_while)
        if self._closed:  # stop() raced with this submit: the worker has gone, fail what is left
            self._fail_leftovers()
        self._on_depth(self._queue.qsize())
        return job.future

    def _wait_for_room(self, job: _Job, wait_while: Callable[[], bool]) -> None:
        with self._waiting_lock:
            self.waiting += 1
        try:
            while wait_while() and not self._stopping:
                try:
                    self._queue.put(job, timeout=WAIT_POLL_S)
                    return
                except queue.Full:
                    continue
            raise QueueFull("server is shutting down" if self._stopping else "gave up waiting for the model queue")
        finally:
            with self._waiting_lock:
                self.waiting -= 1

    def run(self, fn: Callable[[], Any], deadline: float | None = None, is_active: Callable[[], bool] = lambda: True,
            wait_while: Callable[[], bool] | None = None) -> JobResult:
        """submit() and wait for the result (re-raising the job's exception)."""
        return self.submit(fn, deadline, is_active, wait_while).result()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            self._on_depth(self._queue.qsize())
            if job is None:
                self._closed = True
                self._fail_leftovers()
                return
            now = time.monotonic()
            wait = now - job.enqueued
            self._on_wait(wait)
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.deadline is not None and now >= job.deadline:
                self.skipped += 1
                job.future.set_exception(DeadlineExpired(f"deadline expired after {wait * 1000:.0f} ms in the queue"))
                continue
            if not job.is_active():
                self.skipped += 1
                job.future.set_exception(Cancelled("request cancelled while queued"))
                continue
            try:
                job.future.set_result(JobResult(value=job.fn(), queue_wait_s=wait))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting RPC thread
                job.future.set_exception(exc)

    def _fail_leftovers(self) -> None:
        """Fail the jobs still queued once the worker has ended (a submit that raced with stop)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(QueueFull("server is shutting down"))

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, end the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)
