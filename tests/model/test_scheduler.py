"""The scheduler alone, with no model and no torch: random arrivals, sizes, budgets, cancellations and
deadlines, executed by a fake runner that keeps, per cache row, which sequence wrote each position.

Invariants checked after every step:
- every running row fits the layout in force (rows x slot length <= pool; need + 1 <= slot length), so
  the fake runner never sees a row or position outside the layout: no admitted request fails for capacity;
- max_batch_size and the prefill budget per step (its first admission excepted) are never exceeded;
- each row holds exactly what its sequence wrote: the stored prefix of its frame, then its own tokens
  (compaction copies every position, including the one written in the step that freed the row);
- the runner's stores hold exactly the keys the scheduler's ledgers hold, and every planned reuse exists;
- every request ends exactly once, in one of the four end states.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelprune.model.scheduler import LENGTH_BUCKETS, Ledger, Scheduler, SchedulerLimits, slot_for
from pixelprune.model.step import Move, SeqResult, Sequence, Status, StepResult

EOS = 0


def test_slot_for_is_the_smallest_bucket_holding_the_tokens():
    assert LENGTH_BUCKETS[:6] == (256, 384, 512, 768, 1024, 1536) and LENGTH_BUCKETS[-1] == 65536
    assert [slot_for(n) for n in (1, 256, 257, 1025, 65536)] == [256, 256, 384, 1536, 65536]
    assert slot_for(65537) is None


class FakeRunner:
    """Executes plans on a pool of rows of position markers; raises on anything outside the layout."""

    def __init__(self, capacity: int, kv_bytes_per_token: int):
        self.capacity, self.kv_bytes_per_token = capacity, kv_bytes_per_token
        self.rows: dict[int, list] = {}  # row -> markers of positions 0..
        self.slot_len = LENGTH_BUCKETS[0]
        self.prefixes: dict = {}  # key -> markers of the prefix
        self.visions: set = set()

    def _check_row(self, row: int) -> None:
        assert 0 <= row < self.capacity // self.slot_len, f"row {row} outside {self.capacity // self.slot_len} rows"

    def execute(self, plan, tokens) -> StepResult:
        for move in plan.moves:
            self.rows[move.dst] = list(self.rows[move.src][:move.length])
        if plan.slot_len and plan.slot_len != self.slot_len:
            assert len(plan.decodes) * plan.slot_len <= self.capacity
            for d in plan.decodes:
                assert d.position < plan.slot_len
            self.slot_len = plan.slot_len
        for key in plan.evict_prefixes:
            del self.prefixes[key]
        for key in plan.evict_visions:
            self.visions.remove(key)
        prefills = []
        for item in plan.prefills:
            seq = item.seq
            self._check_row(item.row)
            assert seq.need + 1 <= self.slot_len, "admitted beyond the slot"
            if item.prefix_key is not None:
                content = list(self.prefixes[item.prefix_key])  # KeyError: a reuse the store does not hold
            else:
                content = expected_row(seq)[:seq.prefix_len] if seq.cache_key is None else [marker(seq)] * seq.prefix_len
            if item.vision_key is not None:
                assert item.vision_key in self.visions
            content += [seq.id] * (seq.prompt_tokens - len(content))
            self.rows[item.row] = content
            if item.store_prefix_key is not None:
                self.prefixes[item.store_prefix_key] = content[:seq.prefix_len]
            if item.store_vision_key is not None:
                self.visions.add(item.store_vision_key)
            prefills.append(SeqResult(seq=seq, token=tokens(), logprob=-0.5, rope_delta=7,
                                      prefix_stored=item.store_prefix_key is not None,
                                      vision_stored=item.store_vision_key is not None))
        decodes = []
        for d in plan.decodes:
            self._check_row(d.row)
            assert d.position == len(self.rows[d.row]) < self.slot_len - 1, "decode outside the slot"
            assert d.mrope == d.position + d.seq.rope_delta
            self.rows[d.row].append(d.seq.id)
            decodes.append(SeqResult(seq=d.seq, token=tokens(), logprob=-0.25))
        return StepResult(prefills=tuple(prefills), decodes=tuple(decodes))


def marker(seq: Sequence):
    return ("prefix", seq.cache_key, seq.prefix_signature)


def expected_row(seq: Sequence) -> list:
    """What its row must hold: its frame's prefix (own or stored copy: the same keys and values), then its own."""
    if seq.cache_key is None:
        return [seq.id] * max(seq.length, seq.prefix_len)
    return [marker(seq)] * seq.prefix_len + [seq.id] * (seq.length - seq.prefix_len)


def check_state(scheduler: Scheduler, runner: FakeRunner, plan) -> None:
    scheduler.check()
    limits = scheduler.limits
    assert len(plan.decodes) + len(plan.prefills) <= limits.max_batch_size
    prefill_tokens = [p.tokens for p in plan.prefills]
    assert not prefill_tokens[1:] or sum(prefill_tokens) <= limits.max_prefill_tokens
    for seq in scheduler.running:
        if not seq.done:
            got = runner.rows[seq.row][:seq.length]
            if seq.cache_key is None:
                assert got == [seq.id] * seq.length
            else:  # the prefix positions hold its frame's prefix (its own or a stored copy), then its tokens
                assert got == expected_row(seq), f"row {seq.row} of sequence {seq.id} holds another's positions"
    assert set(runner.prefixes) == set(scheduler.prefixes._items)
    assert runner.visions == set(scheduler.visions._items)


arrival = st.tuples(st.integers(1, 3000), st.integers(1, 40), st.sampled_from([None, "a", "b", "c"]),
                    st.sampled_from(["s1", "s2"]), st.booleans(), st.sampled_from([None, 0.5, 3.0, 100.0]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.sampled_from([512, 1024, 2048, 4096, 8192]), max_batch=st.integers(1, 8),
       prefill=st.integers(16, 4096), prefix_bytes=st.sampled_from([0, 20_000, 1_000_000]),
       visions=st.sampled_from([0, 2]), steps=st.lists(st.tuples(st.lists(arrival, max_size=4),
                                                                  st.sets(st.integers(0, 30), max_size=2)),
                                                        min_size=1, max_size=40),
       eos_every=st.integers(2, 30), data=st.data())
def test_random_traffic_keeps_every_invariant(capacity, max_batch, prefill, prefix_bytes, visions, steps, eos_every,
                                              data):
    limits = SchedulerLimits(capacity_tokens=capacity, max_batch_size=max_batch, max_prefill_tokens=prefill,
                             prefix_cache_bytes=prefix_bytes, kv_bytes_per_token=10, vision_cache_size=visions)
    scheduler, runner = Scheduler(limits, frozenset([EOS])), FakeRunner(capacity, 10)
    counter = iter(range(1, sys.maxsize))
    tokens = lambda: EOS if next(counter) % eos_every == 0 else 1  # noqa: E731
    clock, seqs, ends, gone = 0.0, [], {}, set()

    def step():
        plan, ended = scheduler.schedule(clock)
        if not plan.empty:
            ended += scheduler.update(plan, runner.execute(plan, tokens))
        check_state(scheduler, runner, plan)
        for seq in ended:
            assert seq.done and seq.id not in ends, "a sequence ended twice"
            ends[seq.id] = seq.status
            assert seq.row == -1 or seq in scheduler.running

    for arrivals, cancels in steps:
        for extra, budget, key, signature, with_image, timeout in arrivals:
            # the prefix (template head + image tokens) is a function of the frame and its signature;
            # the instruction and the assistant's header always follow it
            prefix_len = (40 if signature == "s1" else 90) if with_image else 0
            seq = Sequence(prompt_tokens=prefix_len + extra, budget=budget, prefix_len=prefix_len, cache_key=key,
                           prefix_signature=(key, signature) if key else None,
                           vision_signature=(key, signature) if key else None,
                           deadline=None if timeout is None else clock + timeout,
                           is_active=lambda s=len(seqs): s not in gone)
            seqs.append(seq)
            if scheduler.fits_alone(seq.need):
                scheduler.add(seq)
            else:  # the engine refuses it before it reaches the scheduler
                assert slot_for(seq.need + 1) is None or slot_for(seq.need + 1) > capacity
                ends[seq.id] = "refused"
        gone |= {c for c in cancels if c < len(seqs)}
        if data.draw(st.booleans()) and scheduler.running:
            scheduler.cancel(scheduler.running[0])
        step()
        clock += 0.25
    for _ in range(10_000):
        if scheduler.idle:
            break
        step()
        clock += 0.25
    step()
    assert scheduler.idle and all(s.done for s in scheduler.running) and not scheduler.waiting
    assert set(ends) == {s.id for s in seqs}
    for seq in seqs:
        if ends[seq.id] == Status.FINISHED:
            assert seq.tokens and (seq.tokens[-1] == EOS or len(seq.tokens) == seq.budget)
            assert seq.logprob == pytest.approx(-0.5 - 0.25 * (len(seq.tokens) - 1))
        if ends[seq.id] == Status.FAILED:
            assert False, f"sequence {seq.id} failed: {seq.error}"  # no failure is planned: none may happen


def test_compaction_copies_the_position_written_in_the_step_that_freed_the_row():
    """Three sequences; the first ends after its first decode. The last row moves into its place with
    every position written so far, including the token fed in that very step."""
    limits = SchedulerLimits(capacity_tokens=4096, max_batch_size=8, max_prefill_tokens=8192,
                             prefix_cache_bytes=0, kv_bytes_per_token=10, vision_cache_size=0)
    scheduler = Scheduler(limits, frozenset([EOS]))
    seqs = [Sequence(prompt_tokens=100 + i, budget=b) for i, b in enumerate((2, 16, 16))]
    for seq in seqs:
        scheduler.add(seq)
    plan, _ = scheduler.schedule(0.0)
    assert [p.row for p in plan.prefills] == [0, 1, 2] and plan.decodes == ()
    result = StepResult(prefills=tuple(SeqResult(seq=s, token=5, rope_delta=0) for s in seqs))
    assert scheduler.update(plan, result) == []
    plan, _ = scheduler.schedule(0.0)
    assert [(d.row, d.position) for d in plan.decodes] == [(0, 100), (1, 101), (2, 102)]
    ended = scheduler.update(plan, StepResult(decodes=tuple(SeqResult(seq=d.seq, token=5) for d in plan.decodes)))
    assert ended == [seqs[0]]  # its budget (2 tokens) is spent
    plan, _ = scheduler.schedule(0.0)
    assert plan.moves == (Move(src=2, dst=0, length=103),)  # 102 prompt positions + the token fed last step
    assert [(d.seq, d.row, d.position) for d in plan.decodes] == [(seqs[2], 0, 103), (seqs[1], 1, 102)]


def test_after_a_large_request_leaves_admissions_fit_the_layout_in_force():
    """A large request makes the slots long; once it leaves, small ones are admitted only as the real
    layout allows: the layout shrinks (a relayout of the running rows) rather than overflow."""
    limits = SchedulerLimits(capacity_tokens=8192, max_batch_size=8, max_prefill_tokens=100_000,
                             prefix_cache_bytes=0, kv_bytes_per_token=10, vision_cache_size=0)
    scheduler, runner = Scheduler(limits, frozenset([EOS])), FakeRunner(8192, 10)
    big, small = Sequence(prompt_tokens=3600, budget=3), Sequence(prompt_tokens=700, budget=30)
    scheduler.add(big)
    scheduler.add(small)
    tokens = lambda: 1  # noqa: E731
    plan, _ = scheduler.schedule(0.0)
    assert plan.slot_len == 4096 and len(plan.prefills) == 2
    scheduler.update(plan, runner.execute(plan, tokens))
    for _ in range(3):
        plan, _ = scheduler.schedule(0.0)
        scheduler.update(plan, runner.execute(plan, tokens))
    assert big.done and not small.done
    later = [Sequence(prompt_tokens=700, budget=30) for _ in range(6)]
    for seq in later:
        scheduler.add(seq)
    plan, _ = scheduler.schedule(0.0)
    assert plan.slot_len == 768 and len(plan.prefills) == 6  # 7 rows of 768 <= 8192: shrunk from 4096
    scheduler.update(plan, runner.execute(plan, tokens))
    check_state(scheduler, runner, plan)


def test_prefill_budget_per_step_and_first_come_first_served():
    limits = SchedulerLimits(capacity_tokens=65536, max_batch_size=16, max_prefill_tokens=1000,
                             prefix_cache_bytes=0, kv_bytes_per_token=10, vision_cache_size=0)
    scheduler, runner = Scheduler(limits, frozenset([EOS])), FakeRunner(65536, 10)
    seqs = [Sequence(prompt_tokens=t, budget=5) for t in (1500, 400, 400, 300, 100)]
    for seq in seqs:
        scheduler.add(seq)
    admitted = []
    for _ in range(3):
        plan, _ = scheduler.schedule(0.0)
        admitted.append([p.seq for p in plan.prefills])
        scheduler.update(plan, runner.execute(plan, lambda: 1))
    # alone over the budget: it still runs, first; then 400 + 400 <= 1000 < 400 + 400 + 300; then the rest
    assert admitted == [seqs[:1], seqs[1:3], seqs[3:]]


def test_requests_on_one_new_frame_reuse_the_first_ones_prefix():
    limits = SchedulerLimits(capacity_tokens=65536, max_batch_size=16, max_prefill_tokens=100_000,
                             prefix_cache_bytes=10_000, kv_bytes_per_token=10, vision_cache_size=4)
    scheduler, runner = Scheduler(limits, frozenset([EOS])), FakeRunner(65536, 10)
    seqs = [Sequence(prompt_tokens=300 + i, budget=4, prefix_len=250, cache_key="frame", prefix_signature="p",
                     vision_signature="v") for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    plan, _ = scheduler.schedule(0.0)  # the first runs the ViT and stores; the others wait one step
    assert [(p.seq, p.store_prefix_key, p.store_vision_key) for p in plan.prefills] == [(seqs[0], "frame", "frame")]
    scheduler.update(plan, runner.execute(plan, lambda: 1))
    plan, _ = scheduler.schedule(0.0)
    assert [(p.seq, p.prefix_key, p.tokens) for p in plan.prefills] == [(seqs[1], "frame", 51), (seqs[2], "frame", 52)]
    assert [s.prefix_hit for s in seqs] == [False, True, True] and scheduler.prefixes.hits == 2
    scheduler.update(plan, runner.execute(plan, lambda: 1))
    check_state(scheduler, runner, plan)
    other = Sequence(prompt_tokens=300, budget=4, prefix_len=250, cache_key="frame", prefix_signature="another",
                     vision_signature="v2")
    scheduler.add(other)
    plan, _ = scheduler.schedule(0.0)
    assert plan.prefills[0].prefix_key is None and plan.prefills[0].store_prefix_key == "frame"  # no reuse


def test_ledger_evicts_least_recently_used_but_never_a_pinned_key():
    ledger = Ledger(10)
    assert ledger.reserve("a", 1, 4, set()) == (True, []) and ledger.reserve("b", 1, 4, set()) == (True, [])
    assert ledger.lookup("a", 1) and not ledger.lookup("a", 2) and (ledger.queries, ledger.hits) == (2, 1)
    assert ledger.reserve("c", 1, 4, set()) == (True, ["b"])  # "a" was used last
    assert ledger.reserve("d", 1, 8, {"a", "c"}) == (False, [])  # only pinned entries could make room
    assert ledger.reserve("e", 1, 11, set()) == (False, []) and Ledger(0).reserve("x", 1, 1, set()) == (False, [])
    assert ledger.used == 8 and "a" in ledger and "c" in ledger and len(ledger) == 2


def test_the_scheduler_imports_no_torch():
    import subprocess

    code = "import sys, pixelprune.model.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
