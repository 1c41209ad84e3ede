"""GroundingClient: calls against real servers with the tiny checkpoint (retries, sessions,
streams, deadlines, TLS) and the keep mask each answer carries."""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from agent_client import GroundingClient, GroundingError, GroundResult
from agent_client.client import AuthenticationError, InvalidRequest, ServerUnavailable
from agent_testlib import TOKEN, server_config
from net_testlib import free_port
from pixelprune.geometry import resize_to, smart_resize
from pixelprune.selectors import select_blocks


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def comparable(result: GroundResult) -> dict:
    """What must not depend on how the image was sent (timings, session ids and the
    server's vision and prefix caches do)."""
    d = result.to_json_dict()
    for key in ("timings", "ttft_ms", "session_id", "vision_cache_hit", "prefix_cache_hit"):
        d.pop(key)
    return d


# --- arguments (no server) -----------------------------------------------------------


def test_client_arguments():
    with pytest.raises(ValueError, match="token"):
        GroundingClient("127.0.0.1:1", token="two\nlines")
    with pytest.raises(ValueError):
        GroundingClient("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError):
        GroundingClient("")
    with GroundingClient("127.0.0.1:1") as client, pytest.raises(ValueError, match="instruction"):
        client.ground(np.zeros((8, 8, 3), np.uint8), "  ")


# --- a real server ---------------------------------------------------------------------


def test_every_input_type_gives_the_same_answer(pointing_server, screenshot, tmp_path):
    path = tmp_path / "shot.png"
    path.write_bytes(png_bytes(screenshot))
    with GroundingClient(f"127.0.0.1:{pointing_server.port}", token=TOKEN) as client:
        results = [client.ground(image, "click the Save button")
                   for image in (path, path.read_bytes(), Image.open(path), screenshot)]
    for r in results[1:]:
        assert comparable(r) == comparable(results[0])
    r = results[0]
    h, w = smart_resize(700, 1000)
    keep = select_blocks(resize_to(screenshot, h, w))
    assert r.image_size == (1000, 700) and r.model_size == (w, h) == (992, 704)
    assert (r.kept_blocks, r.total_blocks) == (int(keep.sum()), keep.size)
    assert r.retain_ratio == pytest.approx(keep.mean())
    # the blocks the server kept, for every input type (the JSON form is in `comparable`)
    assert r.keep.shape == (22, 31) and np.array_equal(r.keep, keep)
    assert r.to_json_dict()["keep_mask"] == {"rows": 22, "cols": 31,
                                             "bits": base64.b64encode(np.packbits(keep).tobytes()).decode()}
    # the answer "(642, 318)" is relative to the image: in the screenshot's own pixels
    assert r.raw_answer == "(642, 318)"
    assert r.point == pytest.approx((642.0, 222.6)) and r.point_normalized == pytest.approx((0.642, 0.318))
    assert r.random_weights and not r.cache_hit and r.ttft_ms > 0


def test_session_reuse_and_change(grounding_server, screenshot):
    with GroundingClient(f"127.0.0.1:{grounding_server.port}", token=TOKEN) as client:
        first = client.ground(screenshot, "open the terminal", session_id="agent-test-1")
        again = client.ground(screenshot, "open the terminal", session_id="agent-test-1")
        changed = screenshot.copy()
        changed[:64, :64] = 0
        third = client.ground(changed, "open the terminal", session_id="agent-test-1")
        fourth = client.ground(changed, "close the terminal", session_id="agent-test-1")  # same screen, new question
    assert first.session_id == again.session_id == "agent-test-1"
    assert first.point is None  # the plain tiny checkpoint answers blanks
    assert not first.cache_hit and first.changed_fraction == 1.0
    assert again.cache_hit and again.changed_fraction == 0.0 and again.raw_answer == first.raw_answer
    assert first.keep is not None and np.array_equal(again.keep, first.keep)  # the reused answer's mask
    assert not third.cache_hit and 0.0 < third.changed_fraction < 0.05
    # the model ran for first, third and fourth (its prompt's KV bytes reported), not for the session hit
    assert first.kv_cache_bytes > 0 and third.kv_cache_bytes > 0 and again.kv_cache_bytes == 0
    assert not first.prefix_cache_hit and not third.prefix_cache_hit
    assert fourth.vision_cache_hit and fourth.prefix_cache_hit and fourth.kv_cache_bytes > 0
    # the rows are built on the engine loop only when the ViT runs: not for the vision hit
    assert first.timings.patchify_ms > 0 and third.timings.patchify_ms > 0 and fourth.timings.patchify_ms == 0
    assert fourth.to_json_dict()["prefix_cache_hit"] is True
    # the answer's confidence: a sum of log-probabilities (< 0), repeated by the session's cached answer
    assert first.answer_logprob < 0 and again.answer_logprob == first.answer_logprob
    assert fourth.to_json_dict()["answer_logprob"] == fourth.answer_logprob < 0


def test_retries_unavailable_until_the_server_is_up(tiny_checkpoint, tiny_engine, token_file, screenshot, caplog):
    from service.server import create_server

    port, started = free_port(), []

    def start_later():
        time.sleep(1.5)
        started.append(create_server(server_config(tiny_checkpoint, token_file, port=port), engine=tiny_engine()))

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="agent_client"), \
                GroundingClient(f"127.0.0.1:{port}", token=TOKEN, retries=10, backoff_initial=0.2,
                                backoff_max=1.0, timeout=120) as client:
            result = client.ground(screenshot, "click the Save button")
    finally:
        thread.join()
        for handle in started:
            handle.stop(0)
    retries = [r.getMessage() for r in caplog.records if "unavailable; retry" in r.getMessage()]
    assert len(retries) >= 2, retries
    first = re.search(r"retry 1 of 10 in ([0-9.]+) s$", retries[0])
    assert first and 0.1 <= float(first.group(1)) <= 0.2  # 0.2 s with jitter in [0.5, 1]
    assert result.total_blocks == 682


def test_unreachable_server_gives_up_with_one_line(caplog):
    port = free_port()
    with caplog.at_level(logging.INFO, logger="agent_client"), \
            GroundingClient(f"127.0.0.1:{port}", retries=2, backoff_initial=0.05, timeout=20) as client:
        with pytest.raises(ServerUnavailable) as info:
            client.ground(np.zeros((64, 64, 3), np.uint8), "click")
    message = str(info.value)
    assert message.startswith(f"cannot reach the grounding server at 127.0.0.1:{port}: ") and "\n" not in message
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2


def _invalid_argument_count(handle) -> float:
    value = handle.metrics.registry.get_sample_value(
        "pixelprune_request_duration_seconds_count", {"rpc": "Ground", "code": "INVALID_ARGUMENT"})
    return value or 0.0


def test_invalid_argument_is_not_retried(grounding_server, screenshot, caplog):
    truncated = png_bytes(screenshot)[:5000]
    before = _invalid_argument_count(grounding_server)
    with caplog.at_level(logging.INFO, logger="agent_client"), \
            GroundingClient(f"127.0.0.1:{grounding_server.port}", token=TOKEN, retries=5) as client:
        with pytest.raises(InvalidRequest) as info:
            client.ground(truncated, "click the Save button")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value).startswith("the server rejected the request: ") and "\n" not in str(info.value)
    assert _invalid_argument_count(grounding_server) == before + 1  # exactly one attempt reached it
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


@pytest.mark.parametrize("token, why", [(None, "no token given"), ("wrong-token", "a bad token")])
def test_bad_token_is_not_retried(grounding_server, token, why, caplog):
    with caplog.at_level(logging.INFO, logger="agent_client"), \
            GroundingClient(f"127.0.0.1:{grounding_server.port}", token=token, retries=5) as client:
        with pytest.raises(AuthenticationError) as info:
            client.ground(np.zeros((64, 64, 3), np.uint8), "click")
    assert f"refused the request ({why})" in str(info.value) and "\n" not in str(info.value)
    assert not caplog.records


def test_stream_counts_and_session(pointing_server, screenshot):
    other = screenshot[::-1].copy()
    frames = [screenshot, screenshot, (other, "open the terminal"), screenshot, other]
    with GroundingClient(f"127.0.0.1:{pointing_server.port}", token=TOKEN) as client:
        results = list(client.stream(iter(frames), "click the Save button", session_id="agent-stream-1"))
    assert len(results) + sum(r.skipped_frames for r in results) == len(frames)
    assert {r.session_id for r in results} == {"agent-stream-1"}
    sequences = [r.sequence for r in results]
    assert sequences == sorted(sequences) and sequences[-1] == len(frames) and sequences[0] >= 1
    assert all(r.point == pytest.approx((642.0, 222.6)) for r in results)
    for r in results:  # the server's keep of the answered frame, sent as the frames list says
        frame = frames[r.sequence - 1]
        pixels = frame[0] if isinstance(frame, tuple) else frame
        assert np.array_equal(r.keep, select_blocks(resize_to(pixels, 704, 992)))


def test_stream_first_frame_may_carry_its_own_instruction(grounding_server, screenshot):
    """(image, instruction) as the FIRST item applies from that frame on, like on any other
    frame: the session then holds that instruction, so a Ground with it is a cache hit."""
    small = np.ascontiguousarray(screenshot[:160, :224])
    with GroundingClient(f"127.0.0.1:{grounding_server.port}", token=TOKEN) as client:
        [answer] = client.stream([(small, "open the terminal")], "click the Save button", session_id="first-own")
        again = client.ground(small, "open the terminal", session_id="first-own")
    assert answer.sequence == 1 and again.cache_hit


def test_stream_surfaces_a_bad_frame(grounding_server, screenshot):
    frames = [screenshot, np.zeros((4, 4, 3), np.float32)]
    with GroundingClient(f"127.0.0.1:{grounding_server.port}", token=TOKEN) as client:
        with pytest.raises(ValueError, match="uint8"):
            list(client.stream(frames, "click the Save button"))


def test_stream_with_a_bad_token(grounding_server, screenshot):
    with GroundingClient(f"127.0.0.1:{grounding_server.port}", token="wrong-token") as client:
        with pytest.raises(AuthenticationError, match="a bad token"):
            list(client.stream([screenshot], "click the Save button"))


def test_deadline(grounding_server, screenshot):
    fresh = np.ascontiguousarray(screenshot[:, ::-1])  # not in any cache: the model has to run
    with GroundingClient(f"127.0.0.1:{grounding_server.port}", token=TOKEN, timeout=0.05) as client:
        with pytest.raises(GroundingError) as info:
            client.ground(fresh, "click the Save button")
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert str(info.value) == f"no answer from 127.0.0.1:{grounding_server.port} within 0.05 s"


def test_stream_arguments_are_checked_at_once(grounding_server):
    with GroundingClient(f"127.0.0.1:{grounding_server.port}", token=TOKEN) as client:
        with pytest.raises(ValueError, match="instruction"):
            client.stream([], "")
        with pytest.raises(ValueError, match="tau"):
            client.stream([], "click", tau=-1.0)


def test_tls_with_a_private_root(tls_server, screenshot):
    handle, cert = tls_server
    for tls in (cert, str(cert), cert.read_bytes()):
        with GroundingClient(f"127.0.0.1:{handle.port}", tls=tls) as client:
            assert client.ground(screenshot, "click the Save button").total_blocks == 682
    with GroundingClient(f"127.0.0.1:{handle.port}", retries=0) as client:  # plaintext to a TLS port
        with pytest.raises(ServerUnavailable):
            client.ground(screenshot, "click the Save button")
    with GroundingClient(f"127.0.0.1:{handle.port}", tls=True, retries=0) as client:  # not in the system roots
        with pytest.raises(ServerUnavailable):
            client.ground(screenshot, "click the Save button")


def test_context_manager_closes_the_channel(grounding_server):
    with GroundingClient(f"127.0.0.1:{grounding_server.port}", token=TOKEN) as client:
        pass
    with pytest.raises(ValueError, match="closed channel"):
        client.ground(np.zeros((64, 64, 3), np.uint8), "click")


def test_a_stream_ended_by_a_draining_server_is_reopened_on_the_next_one(tiny_checkpoint, tiny_engine, token_file,
                                                                          screenshot, caplog):
    """The server a stream runs on drains (it ends its streams with OK after their current frame) and
    another takes its address: the client reopens the stream for the next frames, in the same session,
    numbering on, without the caller seeing more than a pause."""
    from service.server import create_server

    port = free_port()
    config = server_config(tiny_checkpoint, token_file, port=port, extra=("--drain-delay-s", "0"))
    handles = [create_server(config, engine=tiny_engine())]
    answers, switched = [], threading.Event()

    def frames():
        for k in range(30):
            time.sleep(0.1)
            yield np.ascontiguousarray(screenshot[k * 4:k * 4 + 256, :320])

    def switch():  # the first replica drains and goes; a second one comes up at the same address
        handles[0].stop(grace=10)
        handles.append(create_server(config, engine=tiny_engine()))
        switched.set()

    try:
        with caplog.at_level(logging.INFO, logger="agent_client"), \
                GroundingClient(f"127.0.0.1:{port}", token=TOKEN, retries=20, backoff_initial=0.05,
                                backoff_max=0.3, timeout=60) as client:
            for result in client.stream(frames(), "click the Save button", session_id="agent-drain"):
                answers.append(result)
                if len(answers) == 3:
                    threading.Thread(target=switch).start()
        assert switched.wait(30)
    finally:
        for handle in handles:
            handle.stop(0)
    sequences = [a.sequence for a in answers]
    assert sequences == sorted(set(sequences)) and sequences[-1] == 30  # one numbering over both streams
    assert {a.session_id for a in answers} == {"agent-drain"}
    assert any(a.sequence > 10 for a in answers) and len(answers) + sum(a.skipped_frames for a in answers) <= 30
    assert any("ended the stream before its frames did" in r.getMessage() for r in caplog.records)
