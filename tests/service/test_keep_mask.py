"""The keep mask in GroundResponse: the engine's keep for every request, the reused answer's keep
on a session cache hit, and sessions stored before the mask existed (no mask in the response)."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import numpy as np
import pytest
import redis
from PIL import Image

from pixelprune.keepmask import pack_keep, unpack_keep
from pixelprune.model.engine import PruneSettings
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.sessions import CachedAnswer, SessionState, pack_state, unpack_state
from service_testlib import png_bytes, raw_image, stub_for

DESKTOP = "desktop_pcmanfm_xterm_mousepad_1920x1080.png"


@pytest.fixture(scope="module")
def crop(corpus_dir) -> np.ndarray:
    """A 300x200 piece of a real screenshot: smart_resize makes it 320x224, a 7 x 10 block grid
    (70 bits: the packed mask ends in 2 padding bits)."""
    with Image.open(corpus_dir / DESKTOP) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[40:240, 0:300])


def mask_of(response: pb.GroundResponse) -> np.ndarray:
    assert response.HasField("keep_mask")
    m = response.keep_mask
    assert (m.rows, m.cols) == (response.model_height // 32, response.model_width // 32)
    return unpack_keep(m.rows, m.cols, m.bits)


@pytest.mark.parametrize("settings, pruning", [
    (PruneSettings(), None),
    (PruneSettings(method="raster", metric="mae", tau=0.1),
     pb.PruningSettings(method=pb.PruningSettings.METHOD_RASTER, metric=pb.PruningSettings.METRIC_MAE, tau=0.1)),
    (PruneSettings(enabled=False), pb.PruningSettings(disabled=True)),
], ids=["default", "raster-mae-0.1", "unpruned"])
def test_the_response_carries_the_engines_keep(make_server, channels, engine, crop, settings, pruning):
    handle, _ = make_server()
    request = pb.GroundRequest(image=raw_image(crop), instruction="the File menu", pruning=pruning)
    response = stub_for(channels(handle.port)).Ground(request)
    expected = engine.prepare(crop, settings).keep
    assert expected.shape == (7, 10)
    keep = mask_of(response)
    assert np.array_equal(keep, expected)
    assert len(response.keep_mask.bits) == 9 and int(keep.sum()) == response.kept_blocks
    if settings.enabled:
        assert 0 < response.kept_blocks < 70  # a real screenshot has redundant blocks
    else:
        assert keep.all() and response.keep_mask.bits == b"\xff" * 8 + b"\xfc"


def test_a_session_cache_hit_returns_the_mask_it_reuses(make_server, channels, engine, crop):
    handle, counting = make_server()
    stub = stub_for(channels(handle.port))
    pruning = pb.PruningSettings(method=pb.PruningSettings.METHOD_SERPENTINE, tau=0.05)
    request = pb.GroundRequest(image=raw_image(crop), instruction="OK", session_id="keep-1", pruning=pruning)
    first, second = stub.Ground(request), stub.Ground(request)
    # the same pixels as PNG: found equal by their block hashes, answered from the session too
    third = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=png_bytes(crop)), instruction="OK",
                                         session_id="keep-1", pruning=pruning))
    assert not first.cache_hit and second.cache_hit and third.cache_hit and counting.grounded == ["OK"]
    expected = engine.prepare(crop, PruneSettings(method="serpentine", tau=0.05)).keep
    for response in (first, second, third):
        assert np.array_equal(mask_of(response), expected)
        assert response.keep_mask == first.keep_mask


def test_the_mask_survives_redis_and_old_sessions_answer_without_one(make_server, channels, redis_server, crop):
    a, _ = make_server(redis_url=redis_server.url)
    b, engine_b = make_server(redis_url=redis_server.url)
    request = pb.GroundRequest(image=raw_image(crop), instruction="Save", session_id="agent-9")
    first = stub_for(channels(a.port)).Ground(request)
    second = stub_for(channels(b.port)).Ground(request)  # another replica, from Redis
    assert second.cache_hit and second.keep_mask == first.keep_mask and engine_b.grounded == []

    # The session as a server before keep masks stored it: it still answers, with no mask.
    store = redis.Redis.from_url(redis_server.url)
    [key] = store.keys("*:agent-9")  # the key prefix tags the model and settings
    state = unpack_state(store.get(key))
    old = replace(state, answer=replace(state.answer, keep_shape=None, keep_bits=None))
    store.set(key, pack_state(old))
    third = stub_for(channels(b.port)).Ground(request)
    assert third.cache_hit and not third.HasField("keep_mask") and engine_b.grounded == []
    assert (third.raw_answer, third.kept_blocks, third.total_blocks) == \
        (first.raw_answer, first.kept_blocks, first.total_blocks)


# --- the stored form --------------------------------------------------------------------


def _state(keep: np.ndarray | None) -> SessionState:
    """A session of a 128x96 frame (3 x 4 blocks)."""
    packed = None if keep is None else pack_keep(keep)
    answer = CachedAnswer(raw_text="(5, 7)", point=(0.6, 0.7), point_normalized=(0.005, 0.007),
                          kept_blocks=0 if keep is None else int(keep.sum()), total_blocks=12,
                          keep_shape=None if packed is None else packed[:2],
                          keep_bits=None if packed is None else packed[2])
    return SessionState(original_size=(128, 96), resized_size=(128, 96), block_hashes=bytes(range(96)),
                        content_key=b"c" * 16, source_digest=b"s" * 16, instruction="Save",
                        settings=(True, "pred2d", "max", 0.0), answer=answer)


KEEP = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)  # 1001 0110 1111 -> 0x96 0xf0


def old_layout_blob() -> bytes:
    """A session value as written before keep masks: version 1, JSON meta, digests, hashes."""
    meta = {"original_size": [128, 96], "resized_size": [128, 96], "block_hashes": 96, "source_digest": 16,
            "content_key": 16, "instruction": "Save", "settings": [True, "pred2d", "max", 0.0],
            "answer": {"raw_text": "(5, 7)", "point": [0.6, 0.7], "point_normalized": [0.005, 0.007],
                       "kept_blocks": 0, "total_blocks": 12}}
    meta_bytes = json.dumps(meta).encode()
    return struct.pack("<BI", 1, len(meta_bytes)) + meta_bytes + b"c" * 16 + b"s" * 16 + bytes(range(96))


def test_stored_sessions_with_and_without_a_mask():
    with_mask = _state(KEEP)
    assert with_mask.answer.keep_bits == b"\x96\xf0"
    blob = pack_state(with_mask)
    assert blob.endswith(bytes(range(96)) + b"\x96\xf0")
    back = unpack_state(blob)
    assert back == with_mask and np.array_equal(back.answer.keep(), KEEP)
    old = unpack_state(old_layout_blob())
    assert old == _state(None) and old.answer.keep() is None
    assert unpack_state(pack_state(_state(None))) == _state(None)


def test_damaged_masks_read_as_no_session():
    blob = pack_state(_state(KEEP))
    assert unpack_state(blob[:-1]) is None  # a byte short
    assert unpack_state(blob[:-1] + b"\xf1") is None  # a padding bit set
    wrong_shape = replace(_state(KEEP), answer=replace(_state(KEEP).answer, keep_shape=(4, 3)))
    assert unpack_state(pack_state(wrong_shape)) is None
    too_short = replace(_state(KEEP), answer=replace(_state(KEEP).answer, keep_bits=b"\x96"))
    assert unpack_state(pack_state(too_short)) is None
