"""Streams that go silent, health that always answers, frames left unanswered at a stream's end, per-frame metrics."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.errors import StreamIdle
from service.streams import SKIPPED_FRAMES_KEY, NewestFrame, Pending
from service_testlib import FrameFeed, raw_image, stub_for, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING



@pytest.fixture(scope="module")
def small() -> np.ndarray:
    rng = np.random.default_rng(7)
    pixels = np.full((256, 256, 3), 90, np.uint8)
    pixels[100:164, 16:240] = rng.integers(0, 256, size=(64, 224, 3), dtype=np.uint8)
    return pixels


def _check(channel, timeout=5):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def _trailing(call) -> dict:
    return dict(call.trailing_metadata() or ())


def test_silent_streams_cannot_take_the_slots_of_unary_calls_and_are_closed(make_server, channels, small):
    """Streams may hold --max-open-streams of the --max-concurrent-rpcs slots, never all: the next
    stream is refused at once, Ground and the main port's health still answer, and a stream that
    never sends its first frame is closed after --stream-first-frame-timeout-s."""
    handle, _ = make_server(warmup=True, max_concurrent_rpcs=4, max_open_streams=3, stream_first_frame_timeout_s=2.0,
                            stream_idle_timeout_s=30.0)
    stub = stub_for(channels(handle.port))
    feeds = [FrameFeed() for _ in range(3)]
    calls = [stub.GroundStream(iter(feed), timeout=60) for feed in feeds]  # open, never send a frame
    sample = handle.metrics.registry.get_sample_value
    wait_until(lambda: sample("pixelprune_open_streams") == 3, timeout=10)
    extra = FrameFeed()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        next(stub.GroundStream(iter(extra), timeout=60))
    assert time.monotonic() - started < 1.0  # refused at once, not after a timeout
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == ("server busy: 3 streams already open (--max-open-streams); retry later or "
                                    "elsewhere")
    assert sample("pixelprune_streams_refused_total", {"limit": "open"}) == 1
    assert stub.Ground(pb.GroundRequest(image=raw_image(small), instruction="x"), timeout=60).total_blocks == 64
    assert _check(channels(handle.port)) == SERVING
    outcomes = []
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        outcomes.append((info.value.code(), info.value.details(), _trailing(call).get(SKIPPED_FRAMES_KEY)))
    assert time.monotonic() - started < 10  # the first-frame timeout, not the 30 s idle timeout
    assert outcomes == [(grpc.StatusCode.DEADLINE_EXCEEDED,
                         "stream closed: no first frame within 2 s (--stream-first-frame-timeout-s)", "0")] * 3
    wait_until(lambda: sample("pixelprune_streams_total", {"code": "DEADLINE_EXCEEDED"}) == 3)
    assert sample("pixelprune_streams_closed_by_server_total", {"reason": "first_frame_timeout"}) == 3
    assert sample("pixelprune_open_streams") == 0
    for feed in [*feeds, extra]:
        feed.send(None)


def test_idle_clock_restarts_after_each_answer(make_server, channels, small):
    handle, counting = make_server(stream_idle_timeout_s=2.0)
    feed = FrameFeed()
    call = stub_for(channels(handle.port)).GroundStream(iter(feed), timeout=60)
    feed.send(pb.Frame(image=raw_image(small), instruction="first", sequence=1))
    assert next(call).sequence == 1
    time.sleep(1.0)  # half the idle timeout, measured from the answer
    feed.send(pb.Frame(image=raw_image(small), instruction="second", sequence=2))
    assert next(call).sequence == 2
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no frame for 2 s" in info.value.details()
    assert counting.grounded == ["first", "second"]
    feed.send(None)


def test_frames_left_unanswered_are_reported_in_trailing_metadata(make_server, channels, small):
    """Frame 1 waits for the model; 2 and 3 arrive (3 replaces 2); frame 4 is bad and ends the
    stream: 1 is answered, 2 and 3 were never answered nor reported: trailing metadata says 2."""
    handle, counting = make_server()
    release, running = threading.Event(), threading.Event()
    handle.loop.call(lambda: (running.set(), release.wait(60)))
    assert running.wait(10)
    feed = FrameFeed()
    call = stub_for(channels(handle.port)).GroundStream(iter(feed), timeout=60)
    feed.send(pb.Frame(image=raw_image(small), instruction="first", session_id="s", sequence=1))
    wait_until(lambda: handle.loop.waiting == 1)
    for sequence in (2, 3):
        feed.send(pb.Frame(image=raw_image(small), sequence=sequence))
    feed.send(pb.Frame(image=raw_image(small), session_id="other", sequence=4))
    feed.send(None)
    assert feed.drained.wait(30)
    release.set()
    assert next(call).sequence == 1
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _trailing(call)[SKIPPED_FRAMES_KEY] == "2"
    assert counting.grounded == ["first"]
    sample = handle.metrics.registry.get_sample_value
    wait_until(lambda: sample("pixelprune_streams_total", {"code": "INVALID_ARGUMENT"}) == 1)
    assert sample("pixelprune_stream_skipped_frames_total") == 2
    assert sample("pixelprune_stream_frame_duration_seconds_count", {"code": "OK"}) == 1


def test_each_frame_is_one_observation_and_a_whole_stream_none_in_the_unary_histogram(make_server, channels, small):
    handle, _ = make_server()
    feed = FrameFeed()
    call = stub_for(channels(handle.port)).GroundStream(iter(feed), timeout=60)
    for sequence in range(3):
        pixels = small.copy()
        pixels[0, sequence] ^= 1
        feed.send(pb.Frame(image=raw_image(pixels), instruction="x", sequence=sequence))
        assert next(call).sequence == sequence
    feed.send(None)
    assert list(call) == [] and _trailing(call)[SKIPPED_FRAMES_KEY] == "0"
    sample = handle.metrics.registry.get_sample_value
    wait_until(lambda: sample("pixelprune_streams_total", {"code": "OK"}) == 1)
    assert sample("pixelprune_stream_frame_duration_seconds_count", {"code": "OK"}) == 3
    assert sample("pixelprune_stream_frame_duration_seconds_sum", {"code": "OK"}) > 0
    assert sample("pixelprune_request_duration_seconds_count", {"rpc": "GroundStream", "code": "OK"}) is None
    assert sample("pixelprune_request_duration_seconds_count", {"rpc": "Ground", "code": "OK"}) == 0


def test_newest_frame_slot_first_frame_clock():
    """Before the first frame the first-frame timeout applies; after it, the idle timeout."""
    now = [0.0]
    slot = NewestFrame(idle_timeout_s=5.0, clock=lambda: now[0], first_frame_timeout_s=2.0)
    waits = []
    slot._cond.wait = lambda timeout=None: (waits.append(timeout), now.__setitem__(0, now[0] + timeout))
    with pytest.raises(StreamIdle, match="no first frame within 2 s"):
        slot.take()
    assert waits == [2.0] and slot.timed_out == "first_frame"
    slot = NewestFrame(idle_timeout_s=5.0, clock=lambda: now[0], first_frame_timeout_s=2.0)
    slot._cond.wait = lambda timeout=None: (waits.append(timeout), now.__setitem__(0, now[0] + timeout))
    slot.put(Pending(query="a", sequence=1, arrival=0.0))
    assert slot.take()[0].sequence == 1
    slot.answered()
    with pytest.raises(StreamIdle, match="no frame for 5 s"):
        slot.take()
    assert waits == [2.0, 5.0] and slot.timed_out == "idle"
    slot = NewestFrame(idle_timeout_s=5.0, clock=lambda: now[0], first_frame_timeout_s=0.0)  # 0: the idle clock
    slot._cond.wait = lambda timeout=None: (waits.append(timeout), now.__setitem__(0, now[0] + timeout))
    with pytest.raises(StreamIdle, match="no frame for 5 s"):
        slot.take()
    assert waits == [2.0, 5.0, 5.0]


def test_newest_frame_slot_idle_clock():
    """The slot alone, on a fake clock: silent only while nothing is pending or being answered."""
    now = [0.0]
    slot = NewestFrame(idle_timeout_s=5.0, clock=lambda: now[0])
    waits = []
    slot._cond.wait = lambda timeout=None: (waits.append(timeout), now.__setitem__(0, now[0] + timeout))
    slot.put(Pending(query="a", sequence=1, arrival=0.0))
    assert slot.take()[0].sequence == 1
    now[0] = 3.0
    slot.answered()  # the idle clock restarts at 3.0
    with pytest.raises(StreamIdle, match="no frame for 5 s"):
        slot.take()
    assert waits == [5.0]
    slot.put(Pending(query="b", sequence=2, arrival=0.0))
    slot.put(Pending(query="c", sequence=3, arrival=0.0))
    assert slot.abandon() == 2 and slot.take() is None
