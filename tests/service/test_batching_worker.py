"""The batching model worker with the real tiny engine and real gRPC servers on loopback: concurrent
callers batched and answered like single callers, removal from the batch, first-come-first-served
room, prefix-cache reporting and keys, the batch-size limit as a clear error."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, PruneSettings
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.errors import Cancelled, DeadlineExpired, QueueFull
from service.grounding import GroundQuery
from service.worker import ModelWorker
from service_testlib import MAX_NEW_TOKENS, hold_worker, raw_image, scrape, stub_for

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
    release = hold_worker(fresh)  # the eight queue up behind a call, then join one batch together
    stubs = [stub_for(channels(fresh.port)) for _ in requests]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(s.Ground, r, timeout=120) for s, r in zip(stubs, requests)]
        deadline = time.monotonic() + 30
        while fresh.worker.depth < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        answers = [f.result() for f in futures]
    assert [a.raw_answer for a in answers] == [s.raw_answer for s in singles]
    assert [a.kv_cache_bytes for a in answers] == [s.kv_cache_bytes for s in singles]
    assert [(a.kept_blocks, a.total_blocks) for a in answers] == [(s.kept_blocks, s.total_blocks) for s in singles]
    samples = scrape(fresh.metrics_port)
    assert samples["pixelprune_batch_size_bucket{le=4.0}"] < samples["pixelprune_batch_size_bucket{le=8.0}"]
    assert samples["pixelprune_batch_size_bucket{le=8.0}"] == samples["pixelprune_batch_size_count"]


class SlowSteps:
    """The real engine whose decode steps take at least `seconds` (a slow device), counting them."""

    def __init__(self, engine, seconds: float):
        self._engine, self.seconds, self.steps = engine, seconds, 0

    def step(self):
        time.sleep(self.seconds)
        self.steps += 1
        return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_deadline_and_cancellation_remove_sequences_from_the_batch(engine, crops):
    fresh = GroundingEngine(engine.model, engine.processor, max_new_tokens=6, batch=BatchSettings(max_batch_tokens=4096))
    slow = SlowSteps(fresh, 0.1)
    worker = ModelWorker(queue_size=4, engine=slow)
    try:
        prepared = [fresh.prepare(c, PruneSettings()) for c in crops[:3]]
        alone = fresh.ground(prepared[0], "Open the menu", max_new_tokens=6)
        active = [True]
        keep = worker.submit_request(GroundRequest(prepared[0], "Open the menu", max_new_tokens=6))
        late = worker.submit_request(GroundRequest(prepared[1], "x", max_new_tokens=6),
                                     deadline=time.monotonic() + 0.15)
        gone = worker.submit_request(GroundRequest(prepared[2], "y", max_new_tokens=6), is_active=lambda: active[0])
        threading.Timer(0.05, lambda: active.__setitem__(0, False)).start()
        with pytest.raises(DeadlineExpired, match="while the answer was generated"):
            late.result(30)
        with pytest.raises(Cancelled, match="while its answer was generated"):
            gone.result(30)
        assert keep.result(30).value.raw_text == alone.raw_text
        assert worker.removed == 2 and worker.skipped == 0
    finally:
        worker.stop(timeout=10)
    assert fresh.idle


def test_waiting_submitters_get_room_first_come_first_served():
    worker = ModelWorker(queue_size=1)
    order, release, running = [], threading.Event(), threading.Event()
    worker.submit(lambda: (running.set(), release.wait(10)))
    assert running.wait(5)
    worker.submit(lambda: order.append("queued"))  # the queue (1) is full
    results = {}

    def wait_for_room(name):
        results[name] = worker.run(lambda: order.append(name), wait_while=lambda: True)

    threads = []
    for name in ("first", "second", "third"):
        threads.append(threading.Thread(target=wait_for_room, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while worker.waiting < len(threads) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert worker.waiting == 3
    with pytest.raises(QueueFull):  # room goes to those waiting first: no jumping the line
        worker.submit(lambda: order.append("pushy"))
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["queued", "first", "second", "third"] and worker.waiting == 0
    worker.stop(timeout=5)


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


def test_a_frame_too_large_for_the_batch_limit_is_invalid_argument(make_server, channels, crops):
    handle, counting = make_server(max_batch_tokens=256)
    stub = stub_for(channels(handle.port))
    with pytest.raises(grpc.RpcError) as info:  # 64 visual + ~210 text tokens + 4 new: a 384-position slot
        stub.Ground(pb.GroundRequest(image=raw_image(crops[0]), instruction="x",
                                     pruning=pb.PruningSettings(disabled=True)), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-batch-tokens" in info.value.details()
    assert counting.grounded == [] and MAX_NEW_TOKENS == 4
