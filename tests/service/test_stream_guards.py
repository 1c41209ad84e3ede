"""Streams that cannot take the server: open-stream limits per server, tenant and peer; a client that
stops reading; many silent streams; and drain ending streams after their current frame."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np
import pytest

from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.errors import QueueFull
from service.streams import SKIPPED_FRAMES_KEY, Pending, StreamLimits, StreamRegistry, peer_address
from service_testlib import FrameFeed, hold_engine, raw_image, stub_for, wait_until


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    rng = np.random.default_rng(11)
    pixels = np.full((256, 256, 3), 40, np.uint8)
    pixels[32:96, 32:224] = rng.integers(0, 256, size=(64, 192, 3), dtype=np.uint8)
    return pixels


def _refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    return info.value.code(), info.value.details()


def test_registry_limits_send_watchdog_and_drain():
    """The registry alone, on a fake clock: limits by server, tenant and peer address; the watchdog
    cancels only a stream whose send has been blocked longer than the idle timeout; drain ends all."""
    now, cancelled, refused, closed = [0.0], [], [], []
    registry = StreamRegistry(StreamLimits(max_open=4, per_tenant=2, per_peer=1, idle_timeout_s=5.0),
                              clock=lambda: now[0], on_refused=refused.append, on_closed=closed.append)
    a1 = registry.open("alice", "ipv4:10.0.0.1:1000", lambda: cancelled.append("a1"))
    registry.open("alice", "ipv4:10.0.0.2:1000", lambda: cancelled.append("a2"))
    with pytest.raises(QueueFull, match=r"2 of this tenant already open \(--max-streams-per-tenant\)"):
        registry.open("alice", "ipv4:10.0.0.3:1000", lambda: None)
    p1 = registry.open("", "ipv4:10.0.0.1:1000", lambda: cancelled.append("p1"))
    with pytest.raises(QueueFull, match=r"1 of this peer already open \(--max-streams-per-peer\)"):
        registry.open("", "ipv4:10.0.0.1:2000", lambda: None)  # another port of the same host
    registry.open("", "ipv6:[::1]:2000", lambda: None)
    with pytest.raises(QueueFull, match=r"4 streams already open \(--max-open-streams\)"):
        registry.open("bob", "ipv4:10.0.0.9:1", lambda: None)
    assert refused == ["tenant", "peer", "open"] and registry.open_count == 4
    registry.close(p1)
    registry.open("", "ipv4:10.0.0.1:3000", lambda: None)  # the peer's slot is free again
    with a1.sending():
        now[0] = 5.0
        assert registry.sweep() == 0  # exactly the timeout: not yet
        now[0] = 5.5
        assert registry.sweep() == 1 and registry.sweep() == 0  # cancelled once
    assert cancelled == ["a1"] and a1.closed_for == "send_timeout" and closed == ["send_timeout"]
    a2 = next(s for s in registry._streams if s.key == ("tenant", "alice") and s is not a1)
    a2.slot.put(Pending(query="q", sequence=1, arrival=0.0))
    assert registry.drain() == 4 and registry.draining
    assert a2.slot.take() is None and a2.slot.abandon() == 1  # ended: the pending frame is left and counted
    registry.close(a2)
    assert registry.open("carol", "ipv4:10.0.0.5:1", lambda: None).slot.take() is None  # opened while draining


def test_peer_address_drops_the_port():
    assert peer_address("ipv4:127.0.0.1:54321") == "ipv4:127.0.0.1"
    assert peer_address("ipv6:[::1]:54321") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/s.sock") == "unix:/tmp/s.sock"


def test_streams_per_peer_without_auth(make_server, channels, small):
    handle, _ = make_server(max_streams_per_peer=2)
    stub = stub_for(channels(handle.port))
    feeds = [FrameFeed() for _ in range(2)]
    calls = [stub.GroundStream(iter(feed), timeout=60) for feed in feeds]
    for k, feed in enumerate(feeds):
        feed.send(pb.Frame(image=raw_image(small), instruction="x", sequence=k))
    assert [next(call).sequence for call in calls] == [0, 1]
    other = stub_for(channels(handle.port))  # a second connection from the same address counts too
    assert _refusal(other.GroundStream(iter(FrameFeed()), timeout=60)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many open streams: 2 of this peer already open (--max-streams-per-peer); close one first")
    feeds[0].send(None)
    assert list(calls[0]) == []
    feed = FrameFeed()
    feed.send(pb.Frame(image=raw_image(small), instruction="x", sequence=7))
    assert next(other.GroundStream(iter(feed), timeout=60)).sequence == 7
    for feed_ in (feeds[1], feed):
        feed_.send(None)


def test_streams_per_tenant_with_auth(make_server, channels, tmp_path, small):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice tok-a\nbob tok-b\n")
    handle, _ = make_server(auth_token_file=str(tokens), max_streams_per_tenant=1, max_streams_per_peer=0)
    stub = stub_for(channels(handle.port))
    alice, bob = [("authorization", "Bearer tok-a")], [("authorization", "Bearer tok-b")]
    first = FrameFeed()
    call = stub.GroundStream(iter(first), metadata=alice, timeout=60)
    first.send(pb.Frame(image=raw_image(small), instruction="x", sequence=1))
    assert next(call).sequence == 1
    assert _refusal(stub.GroundStream(iter(FrameFeed()), metadata=alice, timeout=60)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many open streams: 1 of this tenant already open (--max-streams-per-tenant); close one first")
    feed = FrameFeed()
    feed.send(pb.Frame(image=raw_image(small), instruction="x", sequence=2))
    assert next(stub.GroundStream(iter(feed), metadata=bob, timeout=60)).sequence == 2  # another tenant
    for feed_ in (first, feed):
        feed_.send(None)


def test_a_client_that_stops_reading_is_closed_after_the_idle_timeout(make_server, small):
    """A real client with a 1 KiB HTTP/2 window keeps sending frames and reads no answer: gRPC's
    send blocks the stream's thread; the watchdog cancels the stream after the idle timeout."""
    handle, _ = make_server(stream_idle_timeout_s=1.0)
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}", options=options)
    stop = threading.Event()

    def frames():  # the same frame in one session: answered from the session, fast
        sequence = 0
        while not stop.is_set():
            sequence += 1
            yield pb.Frame(image=raw_image(small), instruction="x", session_id="blocked", sequence=sequence)
            time.sleep(0.01)

    try:
        call = stub_for(channel).GroundStream(frames(), timeout=60)
        sample = handle.metrics.registry.get_sample_value
        started = time.monotonic()
        wait_until(lambda: sample("pixelprune_streams_closed_by_server_total", {"reason": "send_timeout"}) == 1,
                   timeout=20)
        assert 1.0 < time.monotonic() - started < 10
        wait_until(lambda: sample("pixelprune_open_streams") == 0)  # the RPC's thread is free again
        wait_until(lambda: sample("pixelprune_streams_total", {"code": "CANCELLED"}) == 1)
        answered = sample("pixelprune_stream_frame_duration_seconds_count", {"code": "OK"})
        assert 3 <= answered < 200  # some answers went out, then the window was full
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED
    finally:
        stop.set()
        channel.close()


def test_many_silent_streams_leave_ground_answering(make_server, channels, small):
    """40 streams that never send a frame against 16 RPC slots, 12 of them for streams: 12 stay
    open, the others are refused at once (by the stream limit, or by gRPC's RPC limit when they
    arrive together), and Ground keeps answering."""
    handle, _ = make_server(max_concurrent_rpcs=16, max_open_streams=12, max_streams_per_peer=0)
    stub = stub_for(channels(handle.port))
    feeds = [FrameFeed() for _ in range(40)]
    calls = [stub.GroundStream(iter(feed), timeout=60) for feed in feeds]
    sample = handle.metrics.registry.get_sample_value
    wait_until(lambda: sum(call.done() for call in calls) == 28, timeout=20)
    assert {call.code() for call in calls if call.done()} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert sample("pixelprune_open_streams") == 12
    assert sample("pixelprune_streams_refused_total", {"limit": "open"}) >= 1
    for k in range(3):
        assert stub.Ground(pb.GroundRequest(image=raw_image(small), instruction=f"q{k}"), timeout=60).total_blocks == 64
    for feed in feeds:
        feed.send(None)
    wait_until(lambda: all(call.done() for call in calls))
    assert sum(call.code() == grpc.StatusCode.OK for call in calls) == 12


def test_drain_ends_each_stream_after_its_current_frame(make_server, channels, small, caplog):
    """Stream A waits for its next frame; stream B's frame is in the model queue and another is
    pending. stop(grace=30): A ends at once with OK, B after its queued frame is answered, its
    pending frame counted in the trailer; stop returns long before the grace period is over."""
    handle, _ = make_server()
    stub = stub_for(channels(handle.port))
    feed_a, feed_b = FrameFeed(), FrameFeed()
    call_a, call_b = stub.GroundStream(iter(feed_a), timeout=60), stub.GroundStream(iter(feed_b), timeout=60)
    feed_a.send(pb.Frame(image=raw_image(small), instruction="a", sequence=1))
    assert next(call_a).sequence == 1
    release = hold_engine(handle)
    feed_b.send(pb.Frame(image=raw_image(small), instruction="b", sequence=1))
    wait_until(lambda: handle.loop.waiting == 1)
    feed_b.send(pb.Frame(image=raw_image(small), sequence=2))
    sample = handle.metrics.registry.get_sample_value
    wait_until(lambda: sample("pixelprune_open_streams") == 2)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="service.server"):
        stopper = threading.Thread(target=handle.stop, kwargs={"grace": 30.0})
        stopper.start()
        assert list(call_a) == [] and call_a.code() == grpc.StatusCode.OK
        assert dict(call_a.trailing_metadata())[SKIPPED_FRAMES_KEY] == "0"
        time.sleep(0.3)
        release.set()
        assert [r.sequence for r in call_b] == [1] and call_b.code() == grpc.StatusCode.OK
        assert dict(call_b.trailing_metadata())[SKIPPED_FRAMES_KEY] == "1"
        stopper.join(timeout=30)
    assert not stopper.is_alive() and time.monotonic() - started < 10
    assert "drain: 2 of 2 requests in flight finished" in caplog.text
    assert "GroundStream: 2 of 2, 2 ended after their current frame" in caplog.text
    assert sample("pixelprune_streams_closed_by_server_total", {"reason": "drain"}) == 2
    assert sample("pixelprune_streams_total", {"code": "OK"}) == 2
    for feed in (feed_a, feed_b):
        feed.send(None)
