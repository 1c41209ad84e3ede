"""A real gRPC server on a loopback port with the tiny random Qwen3-VL: round trips, sessions, streams.

The tiny checkpoint has random weights: its answers are noise, so expected
answers come from calling the same engine directly on the same pixels.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from PIL import Image

from pixelprune.model.engine import PruneSettings
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service_testlib import FrameFeed, jpeg_bytes, png_bytes, raw_image, stub_for
from service.images import decode_encoded

DESKTOP = "desktop_pcmanfm_xterm_mousepad_1920x1080.png"


@pytest.fixture(scope="module")
def screenshot(corpus_dir) -> np.ndarray:
    return np.asarray(Image.open(corpus_dir / DESKTOP).convert("RGB"))


@pytest.fixture(scope="module")
def crop(screenshot) -> np.ndarray:
    """A 320x256 piece of a real screenshot: smart_resize keeps it as is (80 blocks)."""
    return np.ascontiguousarray(screenshot[40:296, 0:320])


def _expect(engine, pixels, instruction, settings=PruneSettings()):
    prepared = engine.prepare(pixels, settings)
    return prepared, engine.ground(prepared, instruction)


def _check_against(response, prepared, output, size):
    assert (response.image_width, response.image_height) == size
    assert (response.model_width, response.model_height) == prepared.resized_size
    assert (response.kept_blocks, response.total_blocks) == (prepared.kept_blocks, prepared.total_blocks)
    assert response.retain_ratio == pytest.approx(prepared.kept_blocks / prepared.total_blocks)
    assert response.raw_answer == output.raw_text and response.random_weights
    assert response.found == (output.point is not None)
    if output.point is not None:
        assert (response.point.x, response.point.y) == pytest.approx(output.point)


def test_full_screenshot_png_round_trip(make_server, channels, engine, corpus_dir, screenshot):
    handle, _ = make_server()
    data = (corpus_dir / DESKTOP).read_bytes()
    response = stub_for(channels(handle.port)).Ground(
        pb.GroundRequest(image=pb.Image(encoded=data), instruction="the terminal window"), timeout=120)
    prepared = engine.prepare(screenshot, PruneSettings())
    assert (response.image_width, response.image_height) == (1920, 1080)
    assert (response.model_width, response.model_height) == prepared.resized_size == (1920, 1088)
    assert (response.kept_blocks, response.total_blocks) == (prepared.kept_blocks, 60 * 34)
    assert 0 < response.kept_blocks < response.total_blocks  # a real screenshot has redundant blocks
    t = response.timings
    assert t.decode_ms > 0 and t.vit_ms > 0 and t.prefill_ms > 0 and t.ttft_ms >= t.prefill_ms
    assert t.total_ms >= t.ttft_ms and not response.cache_hit and response.session_id == ""


def test_png_jpeg_and_raw_round_trips_match_the_engine(make_server, channels, engine, crop):
    handle, counting = make_server()
    stub = stub_for(channels(handle.port))
    prepared, output = _expect(engine, crop, "the File menu")
    png = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=png_bytes(crop)), instruction="the File menu"))
    _check_against(png, prepared, output, (320, 256))
    assert not png.vision_cache_hit
    # The same pixels sent raw, without a session: other bytes, so the ViT runs again (the shared
    # vision cache is keyed by exact bytes), and the answer is the same.
    raw = stub.Ground(pb.GroundRequest(image=raw_image(crop), instruction="the File menu"))
    _check_against(raw, prepared, output, (320, 256))
    assert not raw.vision_cache_hit and raw.timings.vit_ms > 0 and raw.timings.decode_ms > 0
    jpeg_data = jpeg_bytes(crop)
    jpeg_prepared, jpeg_output = _expect(engine, decode_encoded(jpeg_data, 10**8), "the File menu")
    jpeg = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=jpeg_data), instruction="the File menu"))
    _check_against(jpeg, jpeg_prepared, jpeg_output, (320, 256))
    assert counting.grounded == ["the File menu"] * 3


def test_pruning_settings_per_request(make_server, channels, engine, crop):
    handle, _ = make_server()
    stub = stub_for(channels(handle.port))
    off = stub.Ground(pb.GroundRequest(image=raw_image(crop), instruction="x",
                                       pruning=pb.PruningSettings(disabled=True)))
    assert off.kept_blocks == off.total_blocks == 80
    raster = stub.Ground(pb.GroundRequest(image=raw_image(crop), instruction="x", pruning=pb.PruningSettings(
        method=pb.PruningSettings.METHOD_RASTER, metric=pb.PruningSettings.METRIC_MAE, tau=0.1)))
    expected = engine.prepare(crop, PruneSettings(method="raster", metric="mae", tau=0.1))
    assert raster.kept_blocks == expected.kept_blocks < 80


def test_second_server_sharing_redis_answers_from_the_session(make_server, channels, redis_server, crop):
    a, engine_a = make_server(redis_url=redis_server.url)
    b, engine_b = make_server(redis_url=redis_server.url)
    request = pb.GroundRequest(image=pb.Image(encoded=png_bytes(crop)), instruction="OK button", session_id="agent-7")
    first = stub_for(channels(a.port)).Ground(request)
    assert not first.cache_hit and first.changed_fraction == 1.0 and first.session_id == "agent-7"
    second = stub_for(channels(b.port)).Ground(request)
    assert second.cache_hit and second.changed_fraction == 0.0 and not second.vision_cache_hit
    assert (second.raw_answer, second.kept_blocks, second.total_blocks) == \
        (first.raw_answer, first.kept_blocks, first.total_blocks)
    assert second.timings.vit_ms == 0 and second.timings.decode_ms == 0  # answered before decoding
    # The same pixels re-encoded (raw): identical frame found by its pixel digest.
    third = stub_for(channels(b.port)).Ground(pb.GroundRequest(image=raw_image(crop), instruction="OK button",
                                                               session_id="agent-7"))
    assert third.cache_hit and third.raw_answer == first.raw_answer and third.timings.decode_ms > 0
    assert engine_a.grounded == ["OK button"] and engine_b.grounded == []


def test_changed_fraction_is_exact_and_new_instruction_reuses_vision(make_server, channels, crop):
    handle, counting = make_server()
    stub = stub_for(channels(handle.port))
    stub.Ground(pb.GroundRequest(image=raw_image(crop), instruction="first", session_id="s"))
    changed = crop.copy()
    for row, col in [(0, 0), (3, 5), (7, 9)]:  # three of the 8 x 10 blocks, one pixel each
        changed[row * 32 + 5, col * 32 + 7] ^= 0xFF
    response = stub.Ground(pb.GroundRequest(image=raw_image(changed), instruction="first", session_id="s"))
    assert response.changed_fraction == 3 / 80 and not response.cache_hit and not response.vision_cache_hit
    again = stub.Ground(pb.GroundRequest(image=raw_image(changed), instruction="second", session_id="s"))
    assert again.changed_fraction == 0.0 and not again.cache_hit and again.vision_cache_hit
    assert again.timings.vit_ms == 0
    # Same pixels as PNG in the same session: the blocks all match, so the vision is reused too.
    third = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=png_bytes(changed)), instruction="third",
                                         session_id="s"))
    assert third.changed_fraction == 0.0 and not third.cache_hit and third.vision_cache_hit
    assert third.raw_answer == stub.Ground(pb.GroundRequest(image=raw_image(changed), instruction="third")).raw_answer
    assert counting.grounded == ["first", "first", "second", "third", "third"]
    bigger = np.ascontiguousarray(np.concatenate([crop, crop[:32]]))  # a different geometry
    resized = stub.Ground(pb.GroundRequest(image=raw_image(bigger), instruction="second", session_id="s"))
    assert resized.changed_fraction == 1.0


def _frames_differing(crop, count):
    out = []
    for k in range(count):
        pixels = crop.copy()
        pixels[5, 5 + k] ^= 0x55
        out.append(pixels)
    return out


def test_stream_newest_frame_wins_and_state_applies_in_order(make_server, channels, crop):
    handle, counting = make_server()
    feed = FrameFeed()
    images = _frames_differing(crop, 5)
    release, running = threading.Event(), threading.Event()
    handle.loop.call(lambda: (running.set(), release.wait(30)))  # hold the model
    assert running.wait(10)
    responses = stub_for(channels(handle.port)).GroundStream(iter(feed), timeout=120)
    feed.send(pb.Frame(image=raw_image(images[0]), instruction="first", sequence=10))
    while handle.loop.waiting < 1:  # frame 10 waits for the model; the next ones pile up behind it
        threading.Event().wait(0.01)
    feed.send(pb.Frame(image=raw_image(images[1]), sequence=11))
    feed.send(pb.Frame(image=raw_image(images[2]), instruction="second", sequence=12))
    feed.send(pb.Frame(image=raw_image(images[3]), sequence=13, pruning=pb.PruningSettings(disabled=True)))
    feed.send(pb.Frame(image=raw_image(images[4]), sequence=14))
    feed.send(None)
    assert feed.drained.wait(30)  # the reader has taken every frame (newest wins in its slot)
    release.set()
    answers = list(responses)
    assert [(r.sequence, r.skipped_frames) for r in answers] == [(10, 0), (14, 3)]
    assert counting.grounded == ["first", "second"]  # frame 12's instruction applied to frame 14
    assert answers[1].kept_blocks == answers[1].total_blocks == 80  # frame 13's pruning too
    assert answers[0].session_id == answers[1].session_id and answers[0].session_id.startswith("stream-")


def test_stream_survives_a_redis_outage(make_server, channels, redis_server, crop):
    handle, _ = make_server(redis_url=redis_server.url)
    feed = FrameFeed()
    responses = stub_for(channels(handle.port)).GroundStream(iter(feed), timeout=120)
    answers = []

    def frame_then_answer(pixels, sequence):
        feed.send(pb.Frame(image=raw_image(pixels), instruction="the clock" if sequence == 0 else "",
                           session_id="live" if sequence == 0 else "", sequence=sequence))
        answers.append(next(responses))

    frame_then_answer(crop, 0)
    frame_then_answer(crop, 1)
    assert answers[1].cache_hit
    redis_server.stop()
    frame_then_answer(crop, 2)  # no session without Redis: answered by the model, not failed
    frame_then_answer(crop, 3)
    redis_server.start()
    handle.grounder.store._retry_at = 0.0  # skip the back-off instead of sleeping through it
    frame_then_answer(crop, 4)  # Redis is back but empty: the model answers and saves the session
    frame_then_answer(crop, 5)
    feed.send(None)
    assert list(responses) == []
    assert [a.sequence for a in answers] == [0, 1, 2, 3, 4, 5]
    assert [a.cache_hit for a in answers] == [False, True, False, False, False, True]
    assert all(a.session_id == "live" for a in answers)
    assert handle.metrics.registry.get_sample_value("pixelprune_redis_errors_total") >= 1


def test_stream_errors_end_the_stream_with_invalid_argument(make_server, channels, crop):
    handle, _ = make_server()
    stub = stub_for(channels(handle.port))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GroundStream(iter([pb.Frame(image=raw_image(crop), sequence=1)])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first frame of a stream must carry an instruction" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GroundStream(iter([pb.Frame(image=pb.Image(encoded=b"junk"), instruction="x")])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a PNG" in info.value.details()
