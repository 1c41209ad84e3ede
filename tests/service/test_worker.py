"""The model worker (bounded queue, deadlines, cancellation) with real threads, and the frame key."""

from __future__ import annotations

import threading
import time

import pytest

from service.grounding import frame_key
from service.errors import Cancelled, DeadlineExpired, QueueFull
from service.worker import ModelWorker


@pytest.fixture()
def worker():
    depths, waits = [], []
    w = ModelWorker(queue_size=2, on_depth=depths.append, on_wait=waits.append)
    w.depths, w.waits = depths, waits
    yield w
    w.stop(timeout=5)


def _block(worker):
    """Occupy the worker until the returned event is set; returns once the blocker is running."""
    release, running = threading.Event(), threading.Event()
    worker.submit(lambda: (running.set(), release.wait(10)))
    assert running.wait(5)
    return release


def test_runs_in_order_and_reports_wait(worker):
    order = []
    futures = [worker.submit(lambda i=i: order.append(i) or i * 10) for i in range(2)]
    assert [f.result(5).value for f in futures] == [0, 10]
    assert order == [0, 1] and len(worker.waits) == 2 and all(w >= 0 for w in worker.waits)


def test_full_queue_refuses_at_once(worker):
    release = _block(worker)
    worker.submit(lambda: 1), worker.submit(lambda: 2)
    assert worker.depth == 2 and max(worker.depths) == 2
    started = time.perf_counter()
    with pytest.raises(QueueFull, match="2 requests already wait"):
        worker.submit(lambda: 3)
    assert time.perf_counter() - started < 0.1
    release.set()


def test_deadline_passed_in_queue_is_not_run(worker):
    release = _block(worker)
    ran = []
    future = worker.submit(lambda: ran.append(1), deadline=time.monotonic() + 0.05)
    time.sleep(0.1)
    release.set()
    with pytest.raises(DeadlineExpired, match="in the queue"):
        future.result(5)
    assert ran == [] and worker.skipped == 1


def test_cancelled_request_is_not_run(worker):
    release = _block(worker)
    ran, active = [], [True]
    future = worker.submit(lambda: ran.append(1), is_active=lambda: active[0])
    active[0] = False
    release.set()
    with pytest.raises(Cancelled):
        future.result(5)
    assert ran == []


def test_exceptions_reach_the_caller_and_the_worker_survives(worker):
    def boom():
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        worker.run(boom)
    assert worker.run(lambda: 7).value == 7


def test_stop_finishes_queued_work_and_refuses_new():
    w = ModelWorker(queue_size=4)
    results = [w.submit(lambda i=i: i) for i in range(3)]
    w.stop(timeout=5)
    assert [f.result(1).value for f in results] == [0, 1, 2]
    with pytest.raises(QueueFull, match="shutting down"):
        w.submit(lambda: 0)


def test_submit_racing_with_stop_is_failed_not_left_hanging():
    """A submit that passed the `_stopping` check just before stop() puts its job after the
    worker has gone: its future must fail at once instead of never resolving."""
    w = ModelWorker(queue_size=4)
    w.stop(timeout=5)
    w._stopping = False  # the state a racing submit saw when it checked
    future = w.submit(lambda: 1)
    with pytest.raises(QueueFull, match="shutting down"):
        future.result(timeout=1)
    assert w.depth == 0


def test_frame_key_separates_tenants_settings_and_sizes():
    a = frame_key("t", b"d", (True, "pred2d", "max", 0.0), (64, 32))
    assert a == frame_key("t", bytearray(b"d"), [True, "pred2d", "max", 0.0], [64, 32])
    assert a != frame_key("t", b"d", (False, "pred2d", "max", 0.0), (64, 32))
    assert a != frame_key("t", b"d", (True, "pred2d", "max", 0.0), (32, 64))
    assert a != frame_key("u", b"d", (True, "pred2d", "max", 0.0), (64, 32))


def test_waiting_for_room_while_wanted(worker):
    release = _block(worker)
    worker.submit(lambda: 1), worker.submit(lambda: 2)  # the queue (2) is full
    wanted = [True]
    threading.Timer(0.3, release.set).start()  # room appears once the blocker ends
    started = time.perf_counter()
    assert worker.run(lambda: 3, wait_while=lambda: wanted[0]).value == 3
    assert time.perf_counter() - started >= 0.25
    release2 = _block(worker)
    worker.submit(lambda: 1), worker.submit(lambda: 2)
    threading.Timer(0.2, lambda: wanted.__setitem__(0, False)).start()  # stops wanting before room appears
    with pytest.raises(QueueFull):
        worker.submit(lambda: 3, wait_while=lambda: wanted[0])
    release2.set()


def test_a_waiter_behind_the_head_that_gives_up_leaves_the_line(worker):
    """Waiters hold requests with numpy arrays: a waiter not at the head that gives up must leave the
    line (identity, not field equality), and the worker must take new work afterwards."""
    from dataclasses import dataclass

    import numpy as np

    release = _block(worker)
    worker.submit(lambda: 1), worker.submit(lambda: 2)  # the queue (2) is full
    head_wanted, second_wanted = [True], [True]
    errors = []

    @dataclass(frozen=True)
    class Call:  # like a GroundRequest: a dataclass holding arrays (its == is ambiguous)
        payload: np.ndarray

        def __call__(self):
            return self.payload

    def wait(wanted, payload):
        try:
            worker.submit(Call(payload), wait_while=lambda: wanted[0])
        except QueueFull as exc:
            errors.append(str(exc))

    head = threading.Thread(target=wait, args=(head_wanted, np.zeros(3)))
    head.start()
    deadline = time.monotonic() + 5
    while worker.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=wait, args=(second_wanted, np.zeros(3)))
    second.start()
    while worker.waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.waiting == 2
    second_wanted[0] = False  # the waiter behind the head gives up
    second.join(5)
    assert errors == ["gave up waiting for the model queue"] and worker.waiting == 1
    head_wanted[0] = False
    head.join(5)
    assert worker.waiting == 0
    release.set()
    while worker.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.run(lambda: 42).value == 42  # no dead job is left in the line: new work is taken at once
