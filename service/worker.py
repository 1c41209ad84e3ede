"""One model worker thread per process, behind a bounded queue, batching requests on the model.

RPC threads do their CPU preprocessing themselves and queue the model's part: a
grounding request (`submit_request`), which joins the engine's running batch, or a
call (`submit`), which runs alone once the batch is empty (warm-up, tests). A full
queue refuses at once (RESOURCE_EXHAUSTED: the client backs off) rather than
letting latency grow without bound; a submitter that may wait (a stream's frame)
waits for room, and waiting submitters get room first come, first served, before
new ones.

The loop: take queued jobs (at most the batch's free rows), admit the requests
among them into the batch (the engine prefills them together; requests that do
not fit the batch's limits wait at the head), then decode one step for the whole
batch and resolve the futures of the sequences that ended. A job whose deadline
passed or whose RPC was cancelled is not started, and is removed from the batch
if that happens while its answer is being generated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from service.errors import Cancelled, DeadlineExpired, QueueFull

log = logging.getLogger(__name__)
WAIT_POLL_S = 0.05  # how often a submitter waiting for room re-checks whether it still wants to wait


@dataclass(eq=False)  # waiting lines compare jobs by identity (the generated __eq__ would compare numpy fields)
class _Job:
    work: Any  # a callable (runs alone) or an engine request (joins the batch)
    batched: bool  # True: `work` is an engine request
    deadline: float | None  # time.monotonic() after which the result is useless; None = none
    is_active: Callable[[], bool]  # False once the RPC is cancelled
    enqueued: float = field(default_factory=time.monotonic)  # monotonic seconds
    future: Future = field(default_factory=Future)  # carries the result or the exception
    claimed: bool = False  # the worker has marked the future running
    wait_s: float = 0.0  # seconds between submit and the model starting the job
    started: float = 0.0  # time.perf_counter() when the model started the job


@dataclass(frozen=True)
class JobResult:
    value: Any  # what the call returned, or the request's GroundingOutput
    queue_wait_s: float  # seconds between submit and the model starting the job
    started: float = 0.0  # time.perf_counter() when the model started the job (call or admission)


@dataclass(frozen=True)
class StepStats:
    batch_size: int  # sequences decoded in this step
    seconds: float  # wall time of the step
    kv_bytes: int  # key/value bytes the batch holds after the step


class ModelWorker:
    """A single thread running the model: calls one at a time, requests batched on `engine`."""

    def __init__(self, queue_size: int, on_depth: Callable[[int], None] | None = None,
                 on_wait: Callable[[float], None] | None = None, name: str = "pixelprune-model",
                 engine=None, on_step: Callable[[StepStats], None] | None = None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.maxsize = queue_size
        self.engine = engine  # admit / step / cancel / batch_settings; None = calls only
        self._queue: deque[_Job] = deque()
        self._waiters: deque[_Job] = deque()  # submitters waiting for room, in arrival order
        self._cond = threading.Condition()
        self._on_depth = on_depth or (lambda depth: None)
        self._on_wait = on_wait or (lambda seconds: None)
        self._on_step = on_step or (lambda stats: None)
        self._stopping = False
        self._closed = False  # the worker thread has ended: nothing queued will run any more
        self.skipped = 0  # jobs not started: deadline passed or RPC cancelled while queued
        self.removed = 0  # sequences taken out of the batch: deadline passed or RPC cancelled
        self._held: deque[_Job] = deque()  # taken from the queue, not started yet (batch limits, or a call)
        self._running: dict = {}  # engine Sequence -> its job
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting in the queue (not counting those the worker holds or runs)."""
        return len(self._queue)

    @property
    def waiting(self) -> int:
        """Submitters waiting for room (streams; see submit's wait_while)."""
        return len(self._waiters)

    def submit(self, fn: Callable[[], Any], deadline: float | None = None,
               is_active: Callable[[], bool] = lambda: True,
               wait_while: Callable[[], bool] | None = None) -> Future:
        """Queue a call that runs alone; its Future resolves to a JobResult.

        With no room: QueueFull at once, or, given `wait_while`, wait for room for as long as
        wait_while() stays True (polled every WAIT_POLL_S), then QueueFull."""
        return self._enqueue(_Job(work=fn, batched=False, deadline=deadline, is_active=is_active), wait_while)

    def submit_request(self, request, deadline: float | None = None, is_active: Callable[[], bool] = lambda: True,
                       wait_while: Callable[[], bool] | None = None) -> Future:
        """Queue an engine request for the batch; its Future resolves to a JobResult with its output."""
        if self.engine is None:
            raise RuntimeError("this worker has no engine to batch requests on")
        return self._enqueue(_Job(work=request, batched=True, deadline=deadline, is_active=is_active), wait_while)

    def run(self, fn: Callable[[], Any], deadline: float | None = None, is_active: Callable[[], bool] = lambda: True,
            wait_while: Callable[[], bool] | None = None) -> JobResult:
        """submit() and wait for the result (re-raising the job's exception)."""
        return self.submit(fn, deadline, is_active, wait_while).result()

    def run_request(self, request, deadline: float | None = None, is_active: Callable[[], bool] = lambda: True,
                    wait_while: Callable[[], bool] | None = None) -> JobResult:
        """submit_request() and wait for the result (re-raising the request's exception)."""
        return self.submit_request(request, deadline, is_active, wait_while).result()

    def _enqueue(self, job: _Job, wait_while: Callable[[], bool] | None) -> Future:
        with self._cond:
            if self._stopping:
                raise QueueFull("server is shutting down")
            if len(self._queue) < self.maxsize and not self._waiters:
                self._queue.append(job)
            elif wait_while is None:
                raise QueueFull(f"server busy: {self.maxsize} requests already wait for the model")
            else:
                self._wait_for_room(job, wait_while)
            self._cond.notify_all()
            depth = len(self._queue)
        if self._closed:  # stop() raced with this submit: the worker has gone, fail what is left
            self._fail_leftovers()
        self._on_depth(depth)
        return job.future

    def _wait_for_room(self, job: _Job, wait_while: Callable[[], bool]) -> None:
        """(Holding the lock.) Wait in line; the first waiter takes the first room."""
        self._waiters.append(job)
        try:
            while not self._stopping:
                if self._waiters[0] is job and len(self._queue) < self.maxsize:
                    self._queue.append(job)
                    return
                if not wait_while():
                    break
                self._cond.wait(WAIT_POLL_S)
            raise QueueFull("server is shutting down" if self._stopping else "gave up waiting for the model queue")
        finally:
            self._waiters.remove(job)
            self._cond.notify_all()

    # ------------------------------------------------------------------ the model thread
    def _loop(self) -> None:
        while True:
            if not self._take():
                break
            if self._held and not self._held[0].batched:
                if not self._running:
                    self._run_call(self._held.popleft())
                    continue
            elif self._held:
                self._admit()
            if self._running:
                self._step()
        self._closed = True
        self._fail_leftovers()

    def _room(self) -> int:
        if self.engine is None:
            return 1
        return max(1, self.engine.batch_settings.max_batch_size - len(self._running))

    def _take(self) -> bool:
        """Move queued jobs into `_held` (up to the batch's free rows; none past a call). Blocks while
        there is nothing to do. False once stopping and everything has been done."""
        with self._cond:
            while not self._queue and not self._held and not self._running:
                if self._stopping:
                    return False
                self._cond.wait()
            while self._queue and len(self._held) < self._room() and not (self._held and not self._held[-1].batched):
                self._held.append(self._queue.popleft())
            self._cond.notify_all()  # room for waiting submitters
            depth = len(self._queue)
        self._on_depth(depth)
        return True

    def _wanted(self, job: _Job) -> bool:
        """Is anyone still waiting for this job? If not, its future is failed (or was cancelled)."""
        if not job.claimed:
            job.claimed = True
            if not job.future.set_running_or_notify_cancel():
                return False
        now = time.monotonic()
        if job.deadline is not None and now >= job.deadline:
            self.skipped += 1
            waited = (now - job.enqueued) * 1000
            job.future.set_exception(DeadlineExpired(f"deadline expired after {waited:.0f} ms in the queue"))
            return False
        if not job.is_active():
            self.skipped += 1
            job.future.set_exception(Cancelled("request cancelled while queued"))
            return False
        return True

    def _began(self, job: _Job, started: float, now: float) -> None:
        """The model started the job at `started` (perf_counter) = `now` (monotonic)."""
        job.wait_s, job.started = now - job.enqueued, started
        self._on_wait(job.wait_s)

    def _run_call(self, job: _Job) -> None:
        if not self._wanted(job):
            return
        self._began(job, time.perf_counter(), time.monotonic())
        try:
            job.future.set_result(JobResult(value=job.work(), queue_wait_s=job.wait_s, started=job.started))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting RPC thread
            job.future.set_exception(exc)

    def _admit(self) -> None:
        batch = []
        while self._held and self._held[0].batched:
            job = self._held.popleft()
            if self._wanted(job):
                batch.append(job)
        if not batch:
            return
        started, now = time.perf_counter(), time.monotonic()
        try:
            seqs = self.engine.admit([job.work for job in batch])
        except Exception as exc:  # noqa: BLE001 - a bug in admission: these requests fail, the worker lives
            log.exception("admitting %d requests failed", len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, seq in zip(batch, seqs):
            self._began(job, started, now)
            self._running[seq] = job
        for job in reversed(batch[len(seqs):]):  # did not fit the batch now: first in line next time
            self._held.appendleft(job)

    def _step(self) -> None:
        now = time.monotonic()
        for seq, job in list(self._running.items()):
            expired = job.deadline is not None and now >= job.deadline
            if expired or not job.is_active():
                self.engine.cancel(seq)
                del self._running[seq]
                self.removed += 1
                job.future.set_exception(DeadlineExpired("deadline expired while the answer was generated")
                                         if expired else Cancelled("request cancelled while its answer was generated"))
        if not self._running:
            return
        report = self.engine.step()
        if report.batch_size:
            self._on_step(StepStats(batch_size=report.batch_size, seconds=report.seconds, kv_bytes=report.kv_bytes))
        for seq in report.finished:
            job = self._running.pop(seq, None)
            if job is None:
                continue
            if seq.error is not None:
                job.future.set_exception(seq.error)
            else:
                job.future.set_result(JobResult(value=seq.output, queue_wait_s=job.wait_s, started=job.started))

    def _fail_leftovers(self) -> None:
        """Fail the jobs still queued once the worker has ended (a submit that raced with stop)."""
        with self._cond:
            leftovers = list(self._queue) + list(self._held)
            self._queue.clear()
            self._held.clear()
        for job in leftovers:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(QueueFull("server is shutting down"))

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones (and the running batch), end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
