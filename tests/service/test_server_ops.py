"""Operating the server: malformed input, overload, deadlines, cancellation, auth, health, SIGTERM, metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelprune.points import grounding_prompt
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from net_testlib import free_port
from service_testlib import (FrameFeed, hold_engine, png_bytes, raw_image, scrape,
                             status_code, stub_for, wait_until)

SERVICE = "pixelprune.grounding.v1.Grounding"


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    rng = np.random.default_rng(1)
    pixels = np.full((256, 256, 3), 230, np.uint8)
    pixels[64:128, 32:224] = rng.integers(0, 256, size=(64, 192, 3), dtype=np.uint8)
    return pixels





def _truncated_png() -> bytes:
    data = png_bytes(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return data[: len(data) // 2]


_bad_images = st.one_of(
    st.just(pb.Image()),
    st.binary(max_size=256).map(lambda b: pb.Image(encoded=b)),
    st.just(pb.Image(encoded=_truncated_png())),
    st.tuples(st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 512))
      .filter(lambda t: t[0] * t[1] * 3 != t[2] or t[0] * t[1] == 0)
      .map(lambda t: pb.Image(raw=pb.RawImage(width=t[0], height=t[1], rgb=bytes(t[2])))),
)
_pruning = st.one_of(st.none(), st.builds(
    lambda m, k, tau, d: pb.PruningSettings(method=m, metric=k, disabled=d, **({} if tau is None else {"tau": tau})),
    st.integers(0, 9), st.integers(0, 9), st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True,
                                                                            width=32)), st.booleans()))
_requests = st.builds(
    lambda image, instruction, session, pruning: pb.GroundRequest(image=image, instruction=instruction,
                                                                  session_id=session, pruning=pruning),
    _bad_images, st.one_of(st.text(max_size=40), st.just(""), st.just(" \n"), st.just("x" * 5000)),
    st.one_of(st.just(""), st.text(max_size=140)), _pruning)


def test_malformed_requests_get_invalid_argument_and_never_crash(make_server, channels, small):
    handle, counting = make_server()
    stub = stub_for(channels(handle.port))

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=_requests)
    def check(request):
        with pytest.raises(grpc.RpcError) as info:
            stub.Ground(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details() and "\n" not in info.value.details()

    check()
    assert counting.grounded == []  # nothing malformed reached the model
    ok = stub.Ground(pb.GroundRequest(image=raw_image(small), instruction="still alive"), timeout=60)
    assert ok.total_blocks == 64


def test_malformed_stream_frames_end_the_stream_with_invalid_argument(make_server, channels):
    handle, counting = make_server()
    stub = stub_for(channels(handle.port))
    frames = st.lists(st.builds(lambda image, pruning, text: pb.Frame(image=image, pruning=pruning, instruction=text),
                                _bad_images, _pruning, st.text(max_size=20)), min_size=1, max_size=3)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames=frames)
    def check(frames):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GroundStream(iter(frames), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()

    check()
    assert counting.grounded == []


def test_message_larger_than_the_limit_is_refused(make_server, channels):
    handle, _ = make_server(max_message_bytes=64 * 1024)
    code = status_code(lambda: stub_for(channels(handle.port)).Ground(
        pb.GroundRequest(image=pb.Image(encoded=bytes(100_000)), instruction="x"), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_many_concurrent_clients(make_server, channels, small):
    handle, counting = make_server(queue_size=16)
    instructions = [f"item {k % 3}" for k in range(12)]

    def one(k):
        stub = stub_for(channels(handle.port))
        return stub.Ground(pb.GroundRequest(image=raw_image(small), instruction=instructions[k],
                                            session_id=f"client-{k}"), timeout=120)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    by_instruction = {}
    for instruction, answer in zip(instructions, answers):
        by_instruction.setdefault(instruction, set()).add(answer.raw_answer)
    assert all(len(texts) == 1 for texts in by_instruction.values())  # same input, same answer
    assert len(counting.grounded) == 12
    assert sum(a.vision_cache_hit for a in answers) == 11  # one ViT run: the rest reuse it on the worker


def test_full_queue_answers_resource_exhausted_at_once(make_server, channels, small):
    handle, counting = make_server(queue_size=1)
    stub = stub_for(channels(handle.port))
    release = hold_engine(handle)
    futures = [stub.Ground.future(pb.GroundRequest(image=raw_image(small), instruction=f"q{k}"), timeout=60)
               for k in range(4)]
    wait_until(lambda: sum(f.done() for f in futures) == 3)  # three refused while the model is held
    release.set()
    codes = sorted((status_code(f.result) for f in futures), key=lambda c: c.name)
    assert codes == [grpc.StatusCode.OK] + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert len(counting.grounded) == 1
    refused = [f for f in futures if f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all("1 requests already wait for the model" in f.details() for f in refused)


def test_deadline_expired_while_queued_is_not_run(make_server, channels, small):
    handle, counting = make_server()
    stub = stub_for(channels(handle.port))
    release = hold_engine(handle)
    future = stub.Ground.future(pb.GroundRequest(image=raw_image(small), instruction="too late"), timeout=3.0)
    wait_until(lambda: handle.loop.waiting == 1)  # queued behind the held engine
    assert status_code(future.result) == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.2)  # the server's copy of the deadline may lag the client's by a clock read
    release.set()
    wait_until(lambda: handle.loop.cancelled == 1 and handle.loop.waiting == 0)
    assert "too late" not in counting.grounded


def test_deadline_passing_while_the_model_runs_is_not_counted_as_ok(make_server, channels, small):
    """The client got DEADLINE_EXCEEDED; the request metric must say so, not OK."""
    handle, counting = make_server()
    real_step = counting.step
    counting.step = lambda on_step=None: (real_step(on_step), time.sleep(1.5))[0]  # a slow device
    stub = stub_for(channels(handle.port))
    code = status_code(lambda: stub.Ground(pb.GroundRequest(image=raw_image(small), instruction="slow"), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    sample = lambda code: handle.metrics.registry.get_sample_value(  # noqa: E731
        "pixelprune_request_duration_seconds_count", {"rpc": "Ground", "code": code})
    wait_until(lambda: sample("DEADLINE_EXCEEDED") == 1)
    assert counting.grounded == ["slow"] and sample("OK") == 0


def test_cancelled_request_is_not_run(make_server, channels, small):
    handle, counting = make_server()
    stub = stub_for(channels(handle.port))
    release = hold_engine(handle)
    future = stub.Ground.future(pb.GroundRequest(image=raw_image(small), instruction="never mind"), timeout=60)
    wait_until(lambda: handle.loop.waiting == 1)
    assert future.cancel()
    time.sleep(1.0)  # the server sees the cancellation (RST_STREAM) well within this
    release.set()
    wait_until(lambda: handle.loop.cancelled == 1 and handle.loop.waiting == 0)
    assert "never mind" not in counting.grounded


def test_auth(make_server, channels, tmp_path, small):
    token_file = tmp_path / "token"
    token_file.write_text("let-me-in\n")
    handle, _ = make_server(auth_token_file=str(token_file))
    channel = channels(handle.port)
    stub = stub_for(channel)
    request = pb.GroundRequest(image=raw_image(small), instruction="x")
    assert status_code(lambda: stub.Ground(request)) == grpc.StatusCode.UNAUTHENTICATED
    wrong = [("authorization", "Bearer let-me-out")]
    assert status_code(lambda: stub.Ground(request, metadata=wrong)) == grpc.StatusCode.UNAUTHENTICATED
    assert status_code(lambda: list(stub.GroundStream(iter([pb.Frame(instruction="x")])))) == \
        grpc.StatusCode.UNAUTHENTICATED
    right = [("authorization", "Bearer let-me-in")]
    assert stub.Ground(request, metadata=right, timeout=60).total_blocks == 64
    health = health_pb2_grpc.HealthStub(channel)  # probes need no token
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_transitions_and_reflection(make_server, channels):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    handle, _ = make_server(warmup=False)
    channel = channels(handle.port)
    stubs = [health_pb2_grpc.HealthStub(channel), health_pb2_grpc.HealthStub(channels(handle.health_port))]

    def statuses():  # the main port and the health port agree, for the server and for the service
        return {stub.Check(health_pb2.HealthCheckRequest(service=name)).status for stub in stubs
                for name in ("", SERVICE)}

    assert statuses() == {health_pb2.HealthCheckResponse.NOT_SERVING}
    handle.warmup()
    assert statuses() == {health_pb2.HealthCheckResponse.SERVING}
    handle.drain()
    assert statuses() == {health_pb2.HealthCheckResponse.NOT_SERVING}
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE, "grpc.health.v1.Health"} <= services


def test_sigterm_drains_in_flight_requests(tiny_checkpoint, corpus_dir, channels, tmp_path, small):
    """SIGTERM: health NOT_SERVING on both ports while the listener still serves (the drain delay),
    then in-flight requests finish and the process exits 0."""
    port, metrics_port, health_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PIXELPRUNE_MAX_NEW_TOKENS": "48", "PIXELPRUNE_DEVICE": "cpu"}  # the first answer lasts
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "pixelprune.cli", "serve", "--model", str(tiny_checkpoint),
                             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
                             "--health-port", str(health_port), "--drain-delay-s", "3", "--max-batch-size", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        channel, health_channel = channels(port), channels(health_port)

        def status(ch):
            try:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError as exc:
                return exc.code()

        wait_until(lambda: status(health_channel) == health_pb2.HealthCheckResponse.SERVING, timeout=120)
        data = (corpus_dir / "desktop_pcmanfm_xterm_mousepad_1920x1080.png").read_bytes()
        stub = stub_for(channel)
        futures = [stub.Ground.future(pb.GroundRequest(image=pb.Image(encoded=data), instruction=f"q{k}"),
                                      timeout=300) for k in range(2)]
        wait_until(lambda: scrape(metrics_port).get("pixelprune_queue_depth") == 1, timeout=60)
        proc.send_signal(signal.SIGTERM)  # one request runs, one waits: both must be answered
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_until(lambda: status(health_channel) == not_serving, timeout=10)
        assert status(channel) == not_serving  # the main listener still answers, and says so
        late = stub.Ground(pb.GroundRequest(image=raw_image(small), instruction="late"), timeout=120)
        assert late.total_blocks == 64  # a request routed during the drain delay is still served
        answers = [f.result() for f in futures]
        assert all(a.total_blocks == 60 * 34 for a in answers)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    text = log.read()
    assert "RANDOM WEIGHTS" in text and "SIGTERM: draining (NOT_SERVING for 3 s while still serving" in text
    assert "stopped" in text


METRICS = ["pixelprune_request_duration_seconds", "pixelprune_ttft_seconds", "pixelprune_stage_duration_seconds",
           "pixelprune_retain_ratio", "pixelprune_visual_tokens_total", "pixelprune_kv_cache_bytes",
           "pixelprune_kv_cache_in_use_bytes", "pixelprune_queue_depth", "pixelprune_queue_wait_seconds",
           "pixelprune_frame_cache_queries_total", "pixelprune_frame_cache_hits_total",
           "pixelprune_changed_block_fraction", "pixelprune_redis_errors_total", "pixelprune_batch_size",
           "pixelprune_time_per_output_token_seconds", "pixelprune_prefix_cache_bytes",
           "pixelprune_prefix_cache_queries_total", "pixelprune_prefix_cache_hits_total",
           "pixelprune_stream_frame_duration_seconds", "pixelprune_streams_total",
           "pixelprune_stream_skipped_frames_total", "pixelprune_open_streams", "pixelprune_inflight_pixels",
           "pixelprune_inflight_pixels_limit"]


def test_every_metric_is_exported_and_moves(make_server, channels, redis_server, small):
    handle, counting = make_server(redis_url=redis_server.url)
    seen_in_use, steps = [], []
    real_step = counting.step
    gauge = lambda: handle.metrics.registry.get_sample_value("pixelprune_kv_cache_in_use_bytes")  # noqa: E731

    def step(on_step=None):  # the gauge as the previous engine step left it, and what each step reports
        seen_in_use.append(gauge())
        reported = []
        ended = real_step(on_step=lambda stats: (reported.append(stats), on_step(stats)))
        steps.append((reported[0] if reported else None, ended))
        return ended

    counting.step = step
    before = scrape(handle.metrics_port)
    for name in METRICS:
        assert any(key.split("{")[0].startswith(name) for key in before), name
    stub = stub_for(channels(handle.port))
    request = pb.GroundRequest(image=pb.Image(encoded=png_bytes(small)), instruction="a", session_id="m")
    first = stub.Ground(request)
    stub.Ground(request)  # cache hit
    release = hold_engine(handle)
    queued = stub.Ground.future(pb.GroundRequest(image=raw_image(small), instruction="a", session_id="n"))
    wait_until(lambda: scrape(handle.metrics_port)["pixelprune_queue_depth"] == 1)
    release.set()
    second = queued.result(timeout=60)
    redis_server.stop()
    stub.Ground(pb.GroundRequest(image=raw_image(small), instruction="b", session_id="m"))  # Redis down: still OK
    after = scrape(handle.metrics_port)
    assert after['pixelprune_request_duration_seconds_count{code=OK,rpc=Ground}'] == 4
    assert after["pixelprune_ttft_seconds_count"] == 3 and after["pixelprune_retain_ratio_count"] == 3
    for stage in ("decode", "resize", "select", "patchify", "vit", "prefill", "decode_tokens"):
        runs = 2 if stage == "vit" else 3  # the last request reused the raw bytes' vision features
        assert after[f"pixelprune_stage_duration_seconds_count{{stage={stage}}}"] == runs, stage
    assert after["pixelprune_visual_tokens_total{kind=kept}"] == 3 * first.kept_blocks
    assert after["pixelprune_visual_tokens_total{kind=pruned}"] == 3 * (64 - first.kept_blocks) > 0
    assert after["pixelprune_kv_cache_bytes_count"] == 3 and after["pixelprune_kv_cache_bytes_sum"] > 0
    assert after["pixelprune_queue_wait_seconds_count"] == 3 and after["pixelprune_queue_depth"] == 0
    assert after["pixelprune_frame_cache_queries_total"] == 4 and after["pixelprune_frame_cache_hits_total"] == 1
    assert after["pixelprune_changed_block_fraction_count"] == 1  # the cache hit: the only frame with a previous one
    assert after["pixelprune_redis_errors_total"] >= 1
    # KV in use: what the running sequences hold after each decode step (prompt + tokens fed), 0 when idle
    decoded = [r for r, _ in steps if r is not None and r.batch_size]
    expected, last = [], None
    for r, _ in steps[:-1]:
        last = float(r.kv_bytes) if r is not None else last
        expected.append(last)
    assert [v for v, e in zip(seen_in_use[1:], expected) if e is not None] == [e for e in expected if e is not None]
    assert after["pixelprune_kv_cache_in_use_bytes"] == 0
    assert after["pixelprune_batch_size_count"] == len(decoded)
    assert after["pixelprune_batch_size_sum"] == sum(r.batch_size for r in decoded)
    per_token = 4 * 2 * 2 * 32 * 4  # tiny model: layers x (K, V) x kv heads x head dim x fp32
    assert any(r.kv_bytes == first.kv_cache_bytes + per_token for r in decoded)  # the prompt + one fed token
    assert second.kept_blocks == first.kept_blocks and second.kv_cache_bytes == first.kv_cache_bytes
    ended = [seq for _, finished in steps for seq in finished]
    assert len(ended) == 3
    assert after["pixelprune_time_per_output_token_seconds_count"] == sum(len(seq.tokens) > 1 for seq in ended)
    # prefix cache: 3 model runs looked; the last (raw bytes of the "n" frame, new instruction) reused it.
    # Two prefixes are held (PNG and raw bytes differ): the prompt up to the last image token.
    assert (after["pixelprune_prefix_cache_queries_total"], after["pixelprune_prefix_cache_hits_total"]) == (3, 1)
    ids = counting.prompt_ids(grounding_prompt("a"))
    after_image = len(ids) - 1 - int(np.flatnonzero(ids == counting.model.config.image_token_id)[0])
    assert after["pixelprune_prefix_cache_bytes"] == 2 * (first.kv_cache_bytes - after_image * per_token)


def test_cancelled_stream_stops_consuming_work(make_server, channels, small):
    handle, counting = make_server()
    release = hold_engine(handle)
    frames = iter([pb.Frame(image=raw_image(small), instruction="abandoned", sequence=1)])
    call = stub_for(channels(handle.port)).GroundStream(frames, timeout=60)
    wait_until(lambda: handle.loop.waiting == 1)
    call.cancel()
    time.sleep(1.0)  # the server sees the cancellation well within this
    release.set()
    wait_until(lambda: handle.loop.cancelled == 1 and handle.loop.waiting == 0)
    assert counting.grounded == []
    sample = handle.metrics.registry.get_sample_value
    wait_until(lambda: sample("pixelprune_streams_total", {"code": "CANCELLED"}) == 1)
    assert sample("pixelprune_stream_frame_duration_seconds_count", {"code": "CANCELLED"}) == 1
    assert sample("pixelprune_streams_total", {"code": "OK"}) == 0
    assert sample("pixelprune_request_duration_seconds_count", {"rpc": "GroundStream", "code": "CANCELLED"}) is None


def test_tls(make_server, tmp_path, small):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    handle, _ = make_server(tls_cert=str(cert), tls_key=str(key))
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"localhost:{handle.port}", credentials) as channel:
        code = status_code(lambda: stub_for(channel).Ground(pb.GroundRequest(image=raw_image(small), instruction=""),
                                                      timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # reached the servicer over TLS
    with grpc.insecure_channel(f"localhost:{handle.port}") as plain:
        assert status_code(lambda: health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)) \
            == grpc.StatusCode.UNAVAILABLE


def test_stream_waits_for_room_instead_of_failing(make_server, channels, small):
    """queue-size 1, held engine, one unary request queued: a stream's frame waits for room (a
    unary request in the same state is refused); newer frames replace each other meanwhile."""
    handle, counting = make_server(queue_size=1)
    stub = stub_for(channels(handle.port))
    release = hold_engine(handle)
    queued = stub.Ground.future(pb.GroundRequest(image=raw_image(small), instruction="unary"), timeout=60)
    wait_until(lambda: handle.loop.waiting == 1)
    feed = FrameFeed()
    responses = stub.GroundStream(iter(feed), timeout=60)
    feed.send(pb.Frame(image=raw_image(small), instruction="first", sequence=1))
    wait_until(lambda: handle.admission.queue.waiting == 1)  # frame 1 waits for room
    assert status_code(lambda: stub.Ground(pb.GroundRequest(image=raw_image(small), instruction="x"), timeout=10)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    for sequence in (2, 3):
        newer = small.copy()
        newer[0, sequence] ^= 1
        feed.send(pb.Frame(image=raw_image(newer), instruction=f"frame {sequence}", sequence=sequence))
    feed.send(None)
    assert feed.drained.wait(30)  # frame 3 has replaced frame 2 in the slot
    release.set()
    answers = list(responses)
    assert queued.result().total_blocks == 64
    assert [(a.sequence, a.skipped_frames) for a in answers] == [(1, 0), (3, 1)]
    assert counting.grounded == ["unary", "first", "frame 3"]
