"""Tenants: several tokens per token file, sessions and the vision cache per tenant, the Bearer scheme in any case."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import redis

from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.auth import BearerAuthInterceptor, bearer_token
from service.config import bare_token_tenant
from service_testlib import png_bytes, raw_image, stub_for


@pytest.fixture(scope="module")
def screen() -> np.ndarray:
    rng = np.random.default_rng(11)
    pixels = np.full((256, 256, 3), 240, np.uint8)
    pixels[40:120, 40:200] = rng.integers(0, 256, size=(80, 160, 3), dtype=np.uint8)
    return pixels


def _auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _ground(channel, token, pixels, instruction, session_id="agent-1"):
    return stub_for(channel).Ground(pb.GroundRequest(image=raw_image(pixels), instruction=instruction,
                                                     session_id=session_id), metadata=_auth(token), timeout=60)


def test_two_servers_with_different_tokens_on_one_redis_share_nothing(make_server, channels, redis_server,
                                                                       tmp_path, screen):
    """The issue's attack: B knows A's session id. B gets no cached answer, no changed fraction
    against A's frame, and does not overwrite A's session."""
    (tmp_path / "a").write_text("token-of-a\n")
    (tmp_path / "b").write_text("token-of-b\n")
    a, engine_a = make_server(redis_url=redis_server.url, auth_token_file=str(tmp_path / "a"))
    b, engine_b = make_server(redis_url=redis_server.url, auth_token_file=str(tmp_path / "b"))
    first = _ground(channels(a.port), "token-of-a", screen, "the OK button")
    assert not first.cache_hit and first.changed_fraction == 1.0
    other = _ground(channels(b.port), "token-of-b", screen, "the OK button")
    assert not other.cache_hit and other.changed_fraction == 1.0 and not other.vision_cache_hit
    again = _ground(channels(a.port), "token-of-a", screen, "the OK button")
    assert again.cache_hit and again.raw_answer == first.raw_answer  # A's session is intact
    assert engine_a.grounded == ["the OK button"] and engine_b.grounded == ["the OK button"]
    keys = sorted(key.decode() for key in redis.Redis.from_url(redis_server.url).keys("*agent-1"))
    tenants = sorted(bare_token_tenant(t) for t in ("token-of-a", "token-of-b"))
    assert [key.rsplit(":", 1)[-1] for key in keys] == [f"{tenant}/agent-1" for tenant in tenants]


def test_tenants_of_one_server_cannot_read_overwrite_or_probe(make_server, channels, tmp_path, screen):
    tokens = tmp_path / "tokens"
    tokens.write_text("# tenant token\nalice tok-alice\nbob tok-bob\nalice tok-alice-2\n")
    handle, counting = make_server(auth_token_file=str(tokens))
    channel = channels(handle.port)
    first = _ground(channel, "tok-alice", screen, "Save")
    assert not first.cache_hit and not first.vision_cache_hit
    # Bob sends Alice's session id, frame and instruction: no hit, no changed fraction, no vision reuse.
    bob = _ground(channel, "tok-bob", screen, "Save")
    assert (bob.cache_hit, bob.changed_fraction, bob.vision_cache_hit) == (False, 1.0, False)
    # Bob again: his own session and his own vision cache entry now.
    bob_again = _ground(channel, "tok-bob", screen, "Open")
    assert (bob_again.cache_hit, bob_again.changed_fraction, bob_again.vision_cache_hit) == (False, 0.0, True)
    # Alice, with her second token: her session is as she left it (Bob's "Open" did not overwrite it).
    alice = _ground(channel, "tok-alice-2", screen, "Save")
    assert alice.cache_hit and alice.raw_answer == first.raw_answer
    # Without a session, the vision cache is still per tenant: a new image sent by Bob...
    other = screen.copy()
    other[0, 0] ^= 0xFF
    stub = stub_for(channel)
    stub.Ground(pb.GroundRequest(image=pb.Image(encoded=png_bytes(other)), instruction="x"),
                metadata=_auth("tok-bob"), timeout=60)
    probe = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=png_bytes(other)), instruction="y"),
                        metadata=_auth("tok-alice"), timeout=60)
    assert not probe.vision_cache_hit  # ...does not tell Alice that someone sent it
    assert counting.grounded == ["Save", "Save", "Open", "x", "y"]


def test_bearer_scheme_is_case_insensitive(make_server, channels, tmp_path, screen):
    (tmp_path / "token").write_text("s3cret")
    handle, _ = make_server(auth_token_file=str(tmp_path / "token"))
    stub = stub_for(channels(handle.port))
    request = pb.GroundRequest(image=raw_image(screen), instruction="x")
    for value in ("Bearer s3cret", "bearer s3cret", "BEARER  s3cret"):
        assert stub.Ground(request, metadata=[("authorization", value)], timeout=60).total_blocks == 64
    for value in ("Basic s3cret", "Bearer", "bearer s3cret2", "s3cret", "Bearers3cret"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Ground(request, metadata=[("authorization", value)], timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, value


def test_token_parsing_and_matching():
    assert bearer_token([("authorization", "bEaReR abc ")]) == b"abc"
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert bearer_token([("authorization", b"Bearer raw-bytes")]) == b"raw-bytes"
    auth = BearerAuthInterceptor({"t1": "alice", "t2": "bob", "t3": "alice"})
    assert [auth.tenant_of([("authorization", f"Bearer {t}")]) for t in ("t1", "t2", "t3", "t4", "t")] == \
        ["alice", "bob", "alice", None, None]
    with pytest.raises(ValueError, match="at least one non-empty token"):
        BearerAuthInterceptor({})
