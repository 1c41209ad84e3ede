"""The runner executes random schedules exactly (tiny checkpoint, fp32, CPU): after every step, every
sequence's cache rows hold what they hold when the same request runs alone, at the same length, and
its answer_logprob equals the solo value; across compaction, joins mid-decode, early leavers, prefix
hits and mixed pruned/unpruned sizes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pixelprune.model.engine import BatchSettings, GroundingEngine, GroundRequest, ModelSpec, PruneSettings
from pixelprune.model.step import Status

ATOL = 1e-5  # fp32: the same sums in other shapes (padded rows, batched matmuls)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> GroundingEngine:
    return GroundingEngine.load(ModelSpec(model=str(tiny_checkpoint), max_new_tokens=16),
                                batch=BatchSettings(max_batch_tokens=4096, max_batch_size=8))


@pytest.fixture(scope="module")
def prepared(engine, corpus_dir) -> list:
    """Pruned and unpruned crops of real screenshots of three sizes."""
    with Image.open(corpus_dir / "web_python_tutorial_classes_1920x1080.png") as img:
        web = np.asarray(img.convert("RGB"))
    with Image.open(corpus_dir / "desktop_pcmanfm_xterm_mousepad_1920x1080.png") as img:
        desk = np.asarray(img.convert("RGB"))
    crops = [web[100:360, 200:552].copy(), desk[300:620, 40:296].copy(), web[500:724, 900:1188].copy()]
    return [engine.prepare(c, s) for c in crops for s in (PruneSettings(), PruneSettings(enabled=False))]


TEXTS = ("Open the menu", "Click the Classes heading", "Where is the search box?", "the terminal window")


def fresh(engine, **batch) -> GroundingEngine:
    settings = dict(max_batch_tokens=4096, max_batch_size=8)
    return GroundingEngine(engine.model, engine.processor, max_new_tokens=16,
                           batch=BatchSettings(**{**settings, **batch}))


def rows_of(engine, seqs) -> dict:
    """id(seq) -> (length, a copy of its cache row's positions 0..length-1) for every sequence in a row."""
    cache = engine.runner.cache
    return {id(s): (s.length, cache.read(s.row, s.length).clone()) for s in engine.scheduler.running
            if s in seqs and s.row >= 0 and s.length}


def solo(engine, request) -> tuple[list[int], float, dict]:
    """Tokens, answer_logprob and the cache row at every length of one request run alone."""
    alone = fresh(engine)
    seq = alone.sequence(request)
    alone.add(seq)
    caches = {}
    while not seq.done:
        alone.step()
        for length, kv in rows_of(alone, [seq]).values():
            caches[length] = kv
    assert seq.status is Status.FINISHED
    return seq.tokens, seq.logprob, caches


def check_rows(engine, seqs, solos) -> int:
    """Compare every placed sequence's row with its solo row at the same length; returns how many."""
    compared = 0
    for seq in seqs:
        got = rows_of(engine, [seq]).get(id(seq))
        if got is None:
            continue
        length, kv = got
        torch.testing.assert_close(kv, solos[id(seq)][2][length], rtol=0, atol=ATOL,
                                   msg=lambda m: f"sequence {seq.id} at length {length}: {m}")
        compared += 1
    return compared


def test_compaction_keeps_the_moved_rows_newest_position(engine, prepared):
    """Three requests admitted together with budgets 3, 16, 16: when the first ends, the last row moves
    into its place. Its cache must equal its solo cache at every position from then on (the row moved in
    the step that freed it carries the key/value written in that very step)."""
    requests = [GroundRequest(prepared[i], TEXTS[k], max_new_tokens=b) for k, (i, b) in enumerate(zip((0, 2, 4), (3, 16, 16)))]
    solos = {}
    batched = fresh(engine)
    seqs = [batched.sequence(r) for r in requests]
    for seq, request in zip(seqs, requests):
        solos[id(seq)] = solo(engine, request)
        batched.add(seq)
    moved = False
    while not batched.idle:
        batched.step()
        moved |= seqs[0].done and seqs[2].row == 0
        check_rows(batched, seqs, solos)
    assert moved and [s.tokens for s in seqs] == [solos[id(s)][0] for s in seqs]
    for seq in seqs:
        assert seq.logprob == pytest.approx(solos[id(seq)][1], abs=1e-4)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_schedules_match_solo_runs_at_every_step(engine, prepared, seed):
    """Random arrivals (joins mid-decode), budgets (early leavers), frames pruned and unpruned, and repeated
    frames with a cache key (prefix hits), under a pool small enough to force waiting and relayouts."""
    rng = random.Random(seed)
    requests = []
    for i in range(7):
        k = rng.randrange(len(prepared))
        requests.append(GroundRequest(prepared[k], rng.choice(TEXTS), max_new_tokens=rng.randint(2, 16),
                                      cache_key=("frame", k) if rng.random() < 0.6 else None))
    first = requests[0].prepared  # a later request on the first frame, with its key: a prefix hit
    requests[0] = GroundRequest(first, TEXTS[0], max_new_tokens=requests[0].max_new_tokens, cache_key="first")
    requests.append(GroundRequest(first, TEXTS[1], max_new_tokens=rng.randint(2, 16), cache_key="first"))
    arrivals = sorted(rng.randint(0, 12) for _ in requests[:-1]) + [14]
    batched = fresh(engine, max_batch_tokens=rng.choice([1536, 2048, 4096]), max_batch_size=rng.choice([3, 8]))
    seqs = [batched.sequence(r) for r in requests]
    solos = {id(s): solo(engine, GroundRequest(r.prepared, r.instruction, max_new_tokens=r.max_new_tokens))
             for s, r in zip(seqs, requests)}
    step, compared, ended = 0, 0, []
    while step <= max(arrivals) or not batched.idle:
        for seq, at in zip(seqs, arrivals):
            if at == step:
                batched.add(seq)
        ended += batched.step()
        batched.scheduler.check()
        compared += check_rows(batched, seqs, solos)
        step += 1
    ended += batched.step()
    assert sorted(map(id, ended)) == sorted(map(id, seqs))  # each ended exactly once
    assert all(s.status is Status.FINISHED for s in seqs)
    assert [s.tokens for s in seqs] == [solos[id(s)][0] for s in seqs]
    for seq in seqs:
        assert seq.logprob == pytest.approx(solos[id(seq)][1], abs=1e-4)
    assert compared > 2 * len(seqs)
    assert seqs[-1].prefix_hit and not seqs[0].prefix_hit


def test_the_prompt_built_on_the_host_equals_the_transformers_one(engine, prepared):
    """What the runner prefills (`prompt_from_chat`: positions from the chat ids on the host) equals the
    reference built from transformers' get_rope_index on the full sequence, field by field."""
    from pixelprune.model.generation import build_prompt, prompt_from_chat
    from pixelprune.model.pipeline import tokenize

    for p in prepared:
        ids = engine.sequence(GroundRequest(p, TEXTS[0])).payload.ids
        full = tokenize(engine.processor, None, [p.image_grid_thw], ids=ids)
        reference = build_prompt(engine.model, full["input_ids"], [p.image_grid_thw], [p.keep])
        host = prompt_from_chat(engine.model, ids, [p.image_grid_thw], [p.keep], engine.device)
        assert torch.equal(host.token_ids, reference.token_ids) and torch.equal(host.positions, reference.positions)
        assert torch.equal(host.visual, reference.visual)
        assert (host.prefix_len, host.end_mrope, host.prefix_mrope) == (
            reference.prefix_len, reference.end_mrope, reference.prefix_mrope)


def test_after_a_long_request_leaves_new_rows_fit_the_layout_in_force(engine, corpus_dir, prepared):
    """A long prompt makes the slots long (768 positions: 2 rows in a pool of 1536); once it has left, a
    small survivor keeps the batch going and three small requests arrive: 4 rows only fit slots of 384, so
    the layout shrinks (a relayout of the survivor's row) and every one runs, with its solo tokens."""
    with Image.open(corpus_dir / "desktop_pcmanfm_xterm_mousepad_1920x1080.png") as img:
        page = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:512, :640])
    long = GroundRequest(engine.prepare(page, PruneSettings(enabled=False)), TEXTS[0], max_new_tokens=2)
    small = [GroundRequest(prepared[0], TEXTS[0], max_new_tokens=8) for _ in range(4)]
    batched = fresh(engine, max_batch_tokens=1536)
    first = [batched.sequence(long), batched.sequence(small[0])]
    assert 384 < first[0].need + 1 <= 768 and 256 < first[1].need + 1 <= 384
    for seq in first:
        batched.add(seq)
    while not first[0].done:
        batched.step()
    assert batched.scheduler.slot_len == 768 and not first[1].done
    later = [batched.sequence(r) for r in small[1:]]
    for seq in later:
        batched.add(seq)
    batched.step()
    assert batched.scheduler.slot_len == 384 and all(s.status is Status.RUNNING for s in later)
    batched.scheduler.check()
    while not batched.idle:
        batched.step()
    alone = solo(engine, small[0])[0]
    assert all(s.status is Status.FINISHED and s.tokens == alone for s in [first[1]] + later)
