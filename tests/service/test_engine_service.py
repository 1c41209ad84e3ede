"""The engine loop behind real gRPC servers on loopback (tiny engine, fp32): concurrent and staggered
callers batched and answered like single callers (answer_logprob included), mixed sizes under a small KV
pool without a failure, removal from the batch, streams that give up while waiting, health that says
when the service is wedged, prefix-cache reporting and keys, the pool limit as a clear error."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from grpc_health.v1 import health_pb2, health_pb2_grpc

from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, PruneSettings
from pixelprune.model.loop import EngineLoop
from pixelprune.model.step import Status
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.grounding import GroundQuery
from service_testlib import MAX_NEW_TOKENS, FrameFeed, hold_engine, raw_image, scrape, stub_for, wait_until

PER_TOKEN = 4 * 2 * 2 * 32 * 4  # tiny model KV bytes per token: layers x (K, V) x kv heads x head dim x fp32


@pytest.fixture(scope="module")
def crops(corpus_dir) -> list[np.ndarray]:
    """Eight different pieces of real screenshots, of four sizes."""
    out = []
    for name in ("web_python_tutorial_classes_1920x1080.png", "desktop_pcmanfm_xterm_mousepad_1920x1080.png"):
        with Image.open(corpus_dir / name) as img:
            pixels = np.asarray(img.convert("RGB"))
        for k, (h, w) in enumerate([(256, 256), (224, 320), (288, 256), (256, 352)]):
            out.append(np.ascontiguousarray(pixels[100 + 60 * k:100 + 60 * k + h, 300:300 + w]))
    return out



def test_eight_concurrent_callers_are_batched_and_get_their_single_answers(make_server, channels, crops):
    handle, counting = make_server(queue_size=8)
    stub = stub_for(channels(handle.port))
    instructions = [f"the {word} button" for word in ("Save", "Open", "Close", "Help", "Edit", "View", "Next", "Back")]
    requests = [pb.GroundRequest(image=raw_image(c), instruction=t) for c, t in zip(crops, instructions)]
    singles = [stub.Ground(r, timeout=60) for r in requests]  # one at a time: batches of one
    fresh, _ = make_server(queue_size=8)
    release = hold_engine(fresh)  # the eight queue up behind a call, then join one batch together
    stubs = [stub_for(channels(fresh.port)) for _ in requests]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(s.Ground, r, timeout=120) for s, r in zip(stubs, requests)]
        wait_until(lambda: fresh.loop.waiting == 8, timeout=30)
        release.set()
        answers = [f.result() for f in futures]
    assert [a.raw_answer for a in answers] == [s.raw_answer for s in singles]
    assert [a.answer_logprob for a in answers] == pytest.approx([s.answer_logprob for s in singles], abs=1e-3)
    assert all(a.answer_logprob < 0 for a in answers)
    assert [a.kv_cache_bytes for a in answers] == [s.kv_cache_bytes for s in singles]
    assert [(a.kept_blocks, a.total_blocks) for a in answers] == [(s.kept_blocks, s.total_blocks) for s in singles]
    samples = scrape(fresh.metrics_port)
    assert samples["pixelprune_batch_size_bucket{le=4.0}"] < samples["pixelprune_batch_size_bucket{le=8.0}"]
    assert samples["pixelprune_batch_size_bucket{le=8.0}"] == samples["pixelprune_batch_size_count"]


def test_staggered_callers_get_their_single_answers_and_log_probabilities(make_server, channels, crops):
    """Callers arriving while others decode (joins mid-decode, early leavers: budgets differ by size),
    pruned and unpruned: each answer and its answer_logprob equal the request served alone."""
    handle, _ = make_server(queue_size=16, max_new_tokens=12)
    stub = stub_for(channels(handle.port))
    off = pb.PruningSettings(disabled=True)
    requests = [pb.GroundRequest(image=raw_image(c), instruction=f"item {i}", pruning=off if i % 3 == 0 else None)
                for i, c in enumerate(crops)]
    singles = [stub.Ground(r, timeout=60) for r in requests]
    fresh, _ = make_server(queue_size=16, max_new_tokens=12)
    stubs = [stub_for(channels(fresh.port)) for _ in requests]

    def call(i):
        time.sleep(0.03 * i)  # staggered arrivals: a few decode steps apart
        return stubs[i].Ground(requests[i], timeout=120)

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(call, range(len(requests))))
    assert [a.raw_answer for a in answers] == [s.raw_answer for s in singles]
    assert [a.answer_logprob for a in answers] == pytest.approx([s.answer_logprob for s in singles], abs=1e-3)
    assert max(scrape(fresh.metrics_port)["pixelprune_batch_size_sum"], 0) > len(requests)


def test_mixed_sizes_under_a_small_kv_pool_never_fail(make_server, channels, corpus_dir, crops):
    """One caller sends an unpruned page that needs long slots while others send small pruned frames; the
    large one leaves and the small ones keep coming: every request is answered (the fit rule uses the
    layout that really exists)."""
    with Image.open(corpus_dir / "desktop_pcmanfm_xterm_mousepad_1920x1080.png") as img:
        big = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:640, :768])  # 480 blocks unpruned
    handle, _ = make_server(queue_size=32, max_batch_tokens=2048, max_new_tokens=6)
    stubs = [stub_for(channels(handle.port)) for _ in range(7)]
    off = pb.PruningSettings(disabled=True)

    def caller(i):
        codes = []
        for k in range(4):
            if i == 0 and k < 2:
                request = pb.GroundRequest(image=raw_image(big), instruction=f"big {k}", pruning=off)
            else:
                request = pb.GroundRequest(image=raw_image(crops[(i + k) % len(crops)]), instruction=f"c{i} {k}")
            try:
                stubs[i].Ground(request, timeout=120)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        return codes

    with ThreadPoolExecutor(7) as pool:
        codes = [c for cs in pool.map(caller, range(7)) for c in cs]
    assert codes == ["OK"] * 28
    samples = scrape(handle.metrics_port)
    assert samples["pixelprune_request_duration_seconds_count{code=INTERNAL,rpc=Ground}"] == 0
    assert samples["pixelprune_kv_cache_capacity_tokens"] == 2048


class SlowSteps:
    """The real engine whose steps take at least `seconds` (a slow device), counting them."""

    def __init__(self, engine, seconds: float):
        self._engine, self.seconds, self.steps = engine, seconds, 0

    def step(self, on_step=None):
        ended = self._engine.step(on_step)
        self.steps += 1
        time.sleep(self.seconds)
        return ended

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_deadline_and_cancellation_remove_sequences_from_the_batch(engine, crops):
    fresh = GroundingEngine(engine.model, engine.processor, max_new_tokens=6, batch=BatchSettings(max_batch_tokens=4096))
    slow = SlowSteps(fresh, 0.1)
    loop = EngineLoop(slow)
    try:
        prepared = [fresh.prepare(c, PruneSettings()) for c in crops[:3]]
        alone = fresh.ground(prepared[0], "Open the menu", max_new_tokens=6)
        active, release = [True], threading.Event()
        loop.call(lambda: release.wait(10))  # the three join one step
        keep = loop.submit(fresh.sequence(GroundRequest(prepared[0], "Open the menu", max_new_tokens=6)))
        late = loop.submit(fresh.sequence(GroundRequest(prepared[1], "x", max_new_tokens=6),
                                          deadline=time.monotonic() + 0.15))  # passes during its first slow step
        gone = loop.submit(fresh.sequence(GroundRequest(prepared[2], "y", max_new_tokens=6),
                                          is_active=lambda: active[0]))
        release.set()
        threading.Timer(0.05, lambda: active.__setitem__(0, False)).start()
        assert late.result(30).status is Status.EXPIRED and late.result().tokens  # it had started
        assert gone.result(30).status is Status.CANCELLED
        assert fresh.output(keep.result(30)).raw_text == alone.raw_text
        assert loop.cancelled == 2 and slow.steps >= 2
    finally:
        loop.stop(timeout=10)
    assert fresh.idle


def test_streams_that_give_up_while_waiting_leave_the_server_answering(make_server, channels, crops):
    """Streams wait in line for a place in the engine's queue (one place); some give up while waiting, not
    only the first in line. Afterwards, on the idle server, Ground answers and a new stream is answered."""
    handle, _ = make_server(queue_size=1)
    release = hold_engine(handle)
    streams = []
    for i in range(5):
        feed = FrameFeed()
        responses = stub_for(channels(handle.port)).GroundStream(iter(feed), timeout=60)
        feed.send(pb.Frame(image=raw_image(crops[i]), instruction=f"s{i}", sequence=i))
        streams.append((feed, responses))
    wait_until(lambda: handle.loop.waiting == 1 and handle.admission.queue.waiting == 4)
    for i in (2, 3):  # two waiters behind the head give up
        streams[i][1].cancel()
    wait_until(lambda: handle.admission.queue.waiting == 2)
    release.set()
    for i in (0, 1, 4):
        assert next(streams[i][1]).sequence == i
        streams[i][0].send(None)
    wait_until(lambda: handle.loop.waiting == 0 and handle.admission.queue.in_use == 0)
    stub = stub_for(channels(handle.port))
    assert stub.Ground(pb.GroundRequest(image=raw_image(crops[5]), instruction="after"), timeout=30).total_blocks
    feed = FrameFeed()
    responses = stub.GroundStream(iter(feed), timeout=60)
    feed.send(pb.Frame(image=raw_image(crops[6]), instruction="new", sequence=9))
    assert next(responses).sequence == 9
    feed.send(None)


def test_health_turns_not_serving_while_the_engine_is_wedged(make_server, channels, crops):
    """Work waits and the engine makes no progress for --stall-timeout-s: health NOT_SERVING on both ports
    and pixelprune_stalled{reason="engine_no_progress"} 1; once it moves again, SERVING and 0."""
    handle, _ = make_server(warmup=True, stall_timeout_s=0.5)
    stubs = [health_pb2_grpc.HealthStub(channels(port)) for port in (handle.port, handle.health_port)]
    status = lambda: {s.Check(health_pb2.HealthCheckRequest()).status for s in stubs}  # noqa: E731
    stalled = lambda: handle.metrics.registry.get_sample_value(  # noqa: E731
        "pixelprune_stalled", {"reason": "engine_no_progress"})
    assert status() == {health_pb2.HealthCheckResponse.SERVING} and stalled() == 0
    release = hold_engine(handle)  # a wedged engine: nothing it holds moves
    queued = stub_for(channels(handle.port)).Ground.future(
        pb.GroundRequest(image=raw_image(crops[0]), instruction="stuck"), timeout=60)
    wait_until(lambda: status() == {health_pb2.HealthCheckResponse.NOT_SERVING}, timeout=10)
    assert stalled() == 1
    release.set()
    assert queued.result().total_blocks
    wait_until(lambda: status() == {health_pb2.HealthCheckResponse.SERVING}, timeout=10)
    assert stalled() == 0


def test_responses_report_prefix_reuse_kv_bytes_and_keys(make_server, channels, engine, crops):
    handle, counting = make_server()
    stub = stub_for(channels(handle.port))
    frame = crops[0]
    cold = stub.Ground(pb.GroundRequest(image=raw_image(frame), instruction="the Save button"))
    hit = stub.Ground(pb.GroundRequest(image=raw_image(frame), instruction="the Open button"))
    assert not cold.prefix_cache_hit and hit.prefix_cache_hit and hit.vision_cache_hit and hit.timings.vit_ms == 0
    prepared = engine.prepare(frame, PruneSettings())
    for response, instruction in ((cold, "the Save button"), (hit, "the Open button")):
        expected = engine.ground(prepared, instruction)
        assert response.raw_answer == expected.raw_text
        assert response.kv_cache_bytes == expected.kv_cache_bytes == expected.kv_cache_bytes // PER_TOKEN * PER_TOKEN > 0
    nudged = frame.copy()
    nudged[100, 100, 0] ^= 1  # one pixel
    assert not stub.Ground(pb.GroundRequest(image=raw_image(nudged), instruction="the Open button")).prefix_cache_hit
    off = pb.PruningSettings(disabled=True)
    assert not stub.Ground(pb.GroundRequest(image=raw_image(frame), instruction="b", pruning=off)).prefix_cache_hit
    other_tenant = handle.grounder.ground(GroundQuery(image=_raw(frame), instruction="the Save button",
                                                      session_id="", pruning=PruneSettings(), tenant="other"))
    assert not other_tenant.prefix_cache_hit and other_tenant.kv_cache_bytes == cold.kv_cache_bytes
    assert other_tenant.raw_answer == cold.raw_answer
    same_tenant = handle.grounder.ground(GroundQuery(image=_raw(frame), instruction="the Help button", session_id="",
                                                     pruning=PruneSettings(), tenant="other"))
    assert same_tenant.prefix_cache_hit
    samples = scrape(handle.metrics_port)
    assert (samples["pixelprune_prefix_cache_queries_total"], samples["pixelprune_prefix_cache_hits_total"]) == (6, 2)


def _raw(pixels):
    from service.images import RawImage

    return RawImage(width=pixels.shape[1], height=pixels.shape[0], rgb=np.ascontiguousarray(pixels).tobytes())


def test_a_frame_too_large_for_the_kv_pool_is_invalid_argument(make_server, channels, crops):
    handle, counting = make_server(max_batch_tokens=256)
    stub = stub_for(channels(handle.port))
    with pytest.raises(grpc.RpcError) as info:  # 64 visual + ~210 text tokens + 4 new: a 384-position slot
        stub.Ground(pb.GroundRequest(image=raw_image(crops[0]), instruction="x",
                                     pruning=pb.PruningSettings(disabled=True)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-batch-tokens" in info.value.details()
    assert counting.grounded == [] and MAX_NEW_TOKENS == 4


def test_the_way_to_the_first_token_is_events_in_order_that_add_up_to_ttft(make_server, channels, crops):
    """arrival -> queued -> admitted -> ViT -> prefill -> first token: monotonic host times (device work
    placed on the host clock from its events), whose spans add up to the TTFT the response reports."""
    handle, _ = make_server()
    answer = handle.grounder.ground(GroundQuery(image=_raw(crops[0]), instruction="the Save button", session_id="",
                                                pruning=PruneSettings()))
    t = answer.timings
    assert [name for name, _ in t.events] == ["arrival", "queued", "admitted", "vit_start", "vit_end",
                                              "prefill_start", "first_token"]
    assert all(span >= 0 for _, span in t.spans())
    assert sum(span for _, span in t.spans()) == pytest.approx(t.ttft, abs=1e-9)
    assert 0 < t.ttft < t.total and t.decode > 0 and t.queue == pytest.approx(dict(t.spans())["admitted"])
    assert t.ttft >= t.decode + t.resize + t.select + t.vit + t.prefill
    response = stub_for(channels(handle.port)).Ground(pb.GroundRequest(image=raw_image(crops[1]), instruction="x"))
    r = response.timings
    assert 0 < r.ttft_ms < r.total_ms and r.vit_ms > 0 and r.prefill_ms > 0 and r.upload_ms == 0
