"""Session stores: in process and in a real redis-server (TTL, outage, reconnect)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import redis

from service.sessions import (CachedAnswer, InProcessSessionStore, RedisSessionStore, SessionState, pack_state,
                              redis_client, unpack_state)


def _state(seed: int = 0, instruction: str = "the Save button", point=(12.5, 40.0)) -> SessionState:
    hashes = np.random.default_rng(seed).integers(0, 2**63, size=(3, 4), dtype=np.uint64)
    return SessionState(
        original_size=(130, 100), resized_size=(128, 96), block_hashes=hashes.astype("<u8").tobytes(),
        content_key=bytes(range(16)), source_digest=bytes([seed]) * 16, instruction=instruction,
        settings=(True, "pred2d", "max", 0.0),
        answer=CachedAnswer(raw_text='{"point_2d": [96, 400]}', point=point,
                            point_normalized=None if point is None else (0.096, 0.4), kept_blocks=5, total_blocks=12))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pack_round_trip_and_damage():
    for state in (_state(), _state(seed=3, instruction="ünïcode ✓", point=None)):
        blob = pack_state(state)
        assert unpack_state(blob) == state
        assert len(blob) < 96 + 32 + 400  # raw hashes and digests, plus a small JSON
    assert np.array_equal(_state().hashes_array(),
                          np.random.default_rng(0).integers(0, 2**63, size=(3, 4), dtype=np.uint64))
    blob = pack_state(_state())
    assert unpack_state(blob[:-1]) is None
    assert unpack_state(b"\x02" + blob[1:]) is None  # another format version
    assert unpack_state(b"") is None
    assert unpack_state(blob[:5] + b"{not json" + blob[14:]) is None
    # Self-consistent lengths, but hashes that do not match the geometry (another writer, a bug):
    # read as "no session" rather than failing every later frame of the session.
    assert unpack_state(pack_state(replace(_state(), block_hashes=_state().block_hashes[:-8]))) is None
    assert unpack_state(pack_state(replace(_state(), resized_size=(160, 96)))) is None


def test_in_process_store_ttl_and_bound():
    clock = FakeClock()
    store = InProcessSessionStore(ttl_s=10, clock=clock, max_sessions=2)
    assert store.get("a") is None
    store.put("a", _state(1))
    clock.now += 9.9
    assert store.get("a") == _state(1)
    store.put("a", _state(2))  # refreshes the TTL
    clock.now += 9.9
    assert store.get("a") == _state(2)
    clock.now += 0.2
    assert store.get("a") is None
    store.put("x", _state(1)), store.put("y", _state(2)), store.put("z", _state(3))
    assert store.get("x") is None and store.get("z") == _state(3) and len(store) == 2
    with pytest.raises(ValueError):
        InProcessSessionStore(ttl_s=0)


def test_in_process_store_drops_expired_sessions_on_put():
    clock = FakeClock()
    store = InProcessSessionStore(ttl_s=10, clock=clock, max_sessions=100)
    for name in "abc":
        store.put(name, _state(1))
    clock.now += 10.5  # a, b, c have expired (ended streams never look themselves up again)
    store.put("d", _state(2))
    assert len(store) == 1 and store.get("d") == _state(2)


def test_redis_store_round_trip_and_ttl(redis_server):
    client = redis_client(redis_server.url)
    errors = []
    store = RedisSessionStore(client, ttl_s=0.3, prefix="t:", on_error=lambda: errors.append(1))
    assert store.get("s1") is None
    store.put("s1", _state(5))
    assert store.get("s1") == _state(5)
    ttl_ms = client.pttl("t:s1")
    assert 0 < ttl_ms <= 300
    assert client.get("t:s1") == pack_state(_state(5))  # the stored value is the packed state
    time.sleep(0.4)
    assert store.get("s1") is None and client.exists("t:s1") == 0
    client.set("t:bad", b"garbage")
    assert store.get("bad") is None
    assert errors == []


def test_redis_outage_is_counted_never_raised_and_reconnects(redis_server):
    clock = FakeClock()
    errors = []
    store = RedisSessionStore(redis_client(redis_server.url), ttl_s=60, on_error=lambda: errors.append(1),
                              backoff_s=1.0, clock=clock)
    store.put("s", _state(1))
    redis_server.stop()
    started = time.perf_counter()
    assert store.get("s") is None  # no exception
    assert len(errors) == 1
    store.put("s", _state(2))  # within the back-off: Redis is not even tried
    assert store.get("s") is None and len(errors) == 1
    clock.now += 1.0
    store.put("s", _state(2))
    assert len(errors) == 2
    assert time.perf_counter() - started < 2.0  # fails fast (connection refused / short timeouts)
    redis_server.start()  # same port, empty (no persistence)
    clock.now += 1.0
    assert store.get("s") is None and len(errors) == 2  # reachable again: a miss, not an error
    store.put("s", _state(3))
    assert store.get("s") == _state(3) and len(errors) == 2


def test_redis_client_settings(redis_server):
    client = redis_client(redis_server.url, timeout_s=0.1)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.1 and kwargs["socket_connect_timeout"] == 0.1
    assert client.ping() is True
    with pytest.raises(redis.exceptions.ConnectionError):
        redis_client("redis://127.0.0.1:1/0").ping()
