"""Continuous batching on the tiny checkpoint (fp32, CPU), through the engine's step: batched answers equal
single answers token for token; joins, early leavers, cancellation, faults and limits. (Caches and
log-probabilities at every step: test_runner.py.)"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from PIL import Image

from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, ModelSpec, PruneSettings
from pixelprune.model.generation import DecodeGraphs
from pixelprune.model.step import Status

FULL = PruneSettings(enabled=False)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> GroundingEngine:
    return GroundingEngine.load(ModelSpec(model=str(tiny_checkpoint), max_new_tokens=6),
                                batch=BatchSettings(max_batch_tokens=4096, max_batch_size=8))


@pytest.fixture(scope="module")
def frames(corpus_dir) -> list[np.ndarray]:
    """Crops of real screenshots of three sizes (they resize to 352x256, 256x320 and 288x224 ... grids)."""
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        web = np.asarray(img.convert("RGB"))
    with Image.open(corpus_dir / "desktop_pcmanfm_xterm_mousepad_1920x1080.png") as img:
        desk = np.asarray(img.convert("RGB"))
    return [web[100:360, 200:552].copy(), desk[300:620, 40:296].copy(), web[500:724, 900:1188].copy()]


def alone(engine, request) -> list[int]:
    """The tokens of one request run with nothing else in the engine."""
    assert engine.idle
    seq = engine.sequence(request)
    engine.add(seq)
    while not engine.idle:
        engine.step()
    assert seq.status is Status.FINISHED
    return seq.tokens


def run(engine, batches: list[list], steps_between: int = 2) -> list:
    """Add each list of requests (or ready Sequences) `steps_between` steps after the previous one; step
    until all ended. Returns the Sequences in request order."""
    seqs, finished = [], []
    for i, batch in enumerate(batches):
        taken = [r if not isinstance(r, GroundRequest) else engine.sequence(r) for r in batch]
        for seq in taken:
            engine.add(seq)
        seqs += taken
        for _ in range(steps_between if i < len(batches) - 1 else 0):
            finished += engine.step()
    while not engine.idle:
        finished += engine.step()
    finished += engine.step()  # the last rows leave
    assert sorted(map(id, finished)) == sorted(map(id, seqs))  # each reported exactly once
    return seqs


def requests(engine, frames, budgets=(6, 6, 6, 6, 6, 6)) -> list[GroundRequest]:
    pruned = [engine.prepare(f, PruneSettings()) for f in frames]
    full = [engine.prepare(f, FULL) for f in frames]
    assert all(p.kept_blocks < p.total_blocks for p in pruned) and all(p.keep.all() for p in full)
    texts = ["Open the menu", "Click the Classes heading", "Where is the search box?"]
    return [GroundRequest(prepared=p, instruction=texts[i % 3], max_new_tokens=budgets[i])
            for i, p in enumerate(pruned + full)]


def test_batched_answers_equal_single_answers(engine, frames):
    """Six requests (three image sizes, pruned and unpruned, three instructions, budgets 2..6) in one
    batched prefill of right-padded rows, then joint decoding where the short ones leave early."""
    reqs = requests(engine, frames, budgets=(6, 2, 6, 4, 6, 3))
    expected = [alone(engine, r) for r in reqs]
    seqs = run(engine, [reqs])
    assert [s.tokens for s in seqs] == expected
    assert [len(t) for t in expected] == [6, 2, 6, 4, 6, 3] or any(t[-1] in engine.eos_token_ids for t in expected)
    for seq, request in zip(seqs, reqs):
        out = engine.output(seq)
        assert out.raw_text == engine.processor.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        assert out.generated_tokens == len(seq.tokens) and out.prefix_reused is False
        assert out.kv_cache_bytes == seq.prompt_tokens * 4 * 2 * 2 * 32 * 4
        assert seq.prompt_tokens == len(engine.prompt_ids(_text(request))) - 1 + request.prepared.kept_blocks


def _text(request):
    from pixelprune.points import grounding_prompt

    return grounding_prompt(request.instruction, request.prompt)


def test_requests_joining_mid_decode(engine, frames):
    reqs = requests(engine, frames)
    expected = [alone(engine, r) for r in reqs]
    seqs = run(engine, [reqs[:2], reqs[2:4], reqs[4:]], steps_between=2)
    assert [s.tokens for s in seqs] == expected


def test_vit_runs_once_for_requests_on_one_new_frame(engine, frames, monkeypatch):
    """Three queued requests on one new frame (same cache key): one ViT call; the two later ones start
    from the prefix the first stored, in the same admission."""
    prepared = engine.prepare(frames[0], PruneSettings())
    texts = ["Open the menu", "Click the Classes heading", "Where is the search box?"]
    expected = [alone(engine, GroundRequest(prepared, t)) for t in texts]
    calls, real = [], engine.runner.encode
    monkeypatch.setattr(engine.runner, "encode", lambda prepared: calls.append(len(prepared)) or real(prepared))
    seqs = run(engine, [[GroundRequest(prepared, t, cache_key=("frame", 0)) for t in texts]])
    assert calls == [1]
    assert [s.tokens for s in seqs] == expected
    assert [engine.output(s).prefix_reused for s in seqs] == [False, True, True]
    assert [engine.output(s).vision_reused for s in seqs] == [False, True, True]


def test_failing_requests_fail_alone(engine, frames):
    """Bad inputs: vision features of another frame and a template without the placeholder are refused
    before they reach the batch; inside a batch, pixel rows cut short (the joint ViT call fails, then only
    that image) and corrupt feature rows (the batched prefill fails, is split, only that row fails)."""
    reqs = requests(engine, frames)[:3]
    expected = [alone(engine, r) for r in reqs]
    good = reqs[0].prepared
    other_vision = engine.encode(reqs[1].prepared)
    vision = engine.encode(good)
    corrupt = dataclasses.replace(vision, embeds=(vision.embeds[0][:-1],))
    with pytest.raises(ValueError, match="other pixels"):
        engine.sequence(GroundRequest(good, "x", vision=other_vision))
    with pytest.raises(ValueError, match="placeholder"):
        engine.sequence(GroundRequest(good, "x", prompt="no placeholder"))
    bad = [GroundRequest(dataclasses.replace(good, staged_rows=good.pixel_values[:-4]), "x"),
           GroundRequest(good, "x", vision=corrupt)]
    mixed = [reqs[0], bad[0], reqs[1], bad[1], reqs[2]]
    seqs = run(engine, [mixed])
    assert [s.tokens for s in seqs[0::2]] == expected and all(s.status is Status.FINISHED for s in seqs[0::2])
    errors = [s.error for s in seqs[1::2]]
    assert all(s.status is Status.FAILED and s.tokens == [] for s in seqs[1::2])
    assert isinstance(errors[0], ValueError) and "rows" in str(errors[0])
    assert isinstance(errors[1], RuntimeError)  # the shape mismatch of the scattered features
    assert engine.idle and all(s.done for s in engine.scheduler.running)


def test_cancel_removes_a_sequence(engine, frames):
    reqs = requests(engine, frames)[:3]
    expected = [alone(engine, r) for r in reqs]
    seqs = [engine.sequence(r) for r in reqs]
    for seq in seqs:
        engine.add(seq)
    engine.step()
    engine.cancel(seqs[1])
    finished = []
    while not engine.idle:
        finished += engine.step()
    finished += engine.step()
    assert finished.count(seqs[1]) == 1 and seqs[1].status is Status.CANCELLED
    assert [seqs[0].tokens, seqs[2].tokens] == [expected[0], expected[2]]


def test_limits_defer_and_refuse(engine, frames):
    """max_batch_size caps the rows; max_batch_tokens caps rows x slot length; a request that could never
    fit is refused with the flag's name."""
    reqs = requests(engine, frames)
    by_rows = GroundingEngine(engine.model, engine.processor, max_new_tokens=6, batch=BatchSettings(max_batch_size=2))
    for seq in (by_rows.sequence(r) for r in reqs[:3]):
        by_rows.add(seq)
    stats = []
    by_rows.step(stats.append)
    by_rows.step(stats.append)
    assert [(s.prefilled, s.batch_size) for s in stats] == [(2, 0), (0, 2)]
    by_tokens = GroundingEngine(engine.model, engine.processor, max_new_tokens=6,
                                batch=BatchSettings(max_batch_tokens=1024))
    seqs = [by_tokens.sequence(r) for r in reqs[3:]]  # unpruned prompts of ~300 tokens + 6: 384-position slots
    for seq in seqs:
        by_tokens.add(seq)
    by_tokens.step()
    assert 256 < max(s.need for s in seqs) < 383 and by_tokens.scheduler.slot_len == 384
    assert [s.status for s in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING]  # 2 slots of 384 in 1024
    small = GroundingEngine(engine.model, engine.processor, max_new_tokens=6, batch=BatchSettings(max_batch_tokens=384))
    big = dataclasses.replace(reqs[3], max_new_tokens=90)  # ~300 + 90 positions: a 512-position slot
    with pytest.raises(ValueError, match="--max-batch-tokens"):
        small.check(big)
    small.check(reqs[3])  # with its 6 new tokens it fits a 384-position slot
    assert small.ground(reqs[3].prepared, reqs[3].instruction).generated_tokens >= 1


def test_stop_after_point(tmp_path, frames):
    from pixelprune.model.tiny import write_tiny_checkpoint

    rigged = write_tiny_checkpoint(tmp_path / "rigged", answer="(642, 318)")
    plain = GroundingEngine.load(ModelSpec(model=str(rigged), max_new_tokens=24))
    stopping = GroundingEngine(plain.model, plain.processor, max_new_tokens=24,
                               batch=BatchSettings(stop_after_point=True))
    prepared = plain.prepare(frames[0], PruneSettings())
    full, early = plain.ground(prepared, "Open the menu"), stopping.ground(prepared, "Open the menu")
    assert full.raw_text == early.raw_text == "(642, 318)"
    assert early.generated_tokens == full.generated_tokens - 1  # the end-of-turn token is not generated
    assert early.point == full.point


def test_decode_graphs_fall_back_to_eager_off_cuda(engine, frames, caplog):
    """On a CPU the capture fails: the step runs eagerly (same tokens) after one logged warning, and the
    eager steps are counted."""
    request = requests(engine, frames)[0]
    expected = alone(engine, request)
    fresh = GroundingEngine(engine.model, engine.processor, max_new_tokens=6, batch=BatchSettings(max_batch_tokens=4096))
    runner = fresh.runner
    runner.graphs = DecodeGraphs(runner._step_fn, lambda: runner.cache.slot_len)
    stats = []
    with caplog.at_level(logging.WARNING, logger="pixelprune.model.generation"):
        seq = fresh.sequence(request)
        fresh.add(seq)
        while not fresh.idle:
            fresh.step(stats.append)
    assert seq.tokens == expected and len(runner.graphs) == 0
    assert sum("CUDA graph capture" in r.message for r in caplog.records) == 1
    assert sum(s.eager_steps for s in stats) == len(expected) - 1 == sum(s.batch_size for s in stats)
