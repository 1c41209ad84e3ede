"""The engine's scheduler: which sequences run, in which cache rows, and what the next step does.

    scheduler.add(seq)                     a request waits (first come, first served)
    plan = scheduler.schedule(now)         end the cancelled and expired, compact the rows, admit -> StepPlan
    ended = scheduler.update(plan, result) tokens and errors in -> the sequences that ended

No torch here: plain state in, a plain description of the step out (`StepPlan`), plain
results back (`StepResult`), so every decision is tested without a model. The runner
(`pixelprune.model.runner`) executes plans; the engine loop calls the three verbs in turn.

A step runs, in this order: the row moves of the compaction (the rows of sequences that
ended move down, each with every position its sequence has written), the layout change
(slot length), evictions from the prefix and vision stores, the prefill of the admitted
sequences (rows after the running ones), then one decode token for every sequence that
was running before the step. Sequences admitted in a step decode from the next one.

Invariants (`check`, asserted by the tests after every schedule):
- the running sequences hold rows 0..n-1, n <= max_batch_size, and n * slot_len <= capacity;
- every running sequence fits the layout in force: need + 1 <= slot_len (the slot's last
  position is never used: padding writes there), so no admitted request fails for capacity;
- the prefill tokens of one step are <= max_prefill_tokens, except a step's first admission
  (a prompt larger than the budget still runs, alone);
- each sequence ends exactly once (FINISHED, FAILED, CANCELLED or EXPIRED) and leaves its row.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

from pixelprune.model.step import (Decode, Move, Prefill, SeqResult, Sequence, Status, StepPlan,
                                   StepResult)

# Slot lengths (tokens): 256, 384, 512, 768, ... (x2 and x1.5 steps) up to 64K; one CUDA graph each.
LENGTH_BUCKETS = tuple(sorted({base * 2 ** k for base in (256, 384) for k in range(9)} - {384 * 2 ** 8}))


def slot_for(tokens: int) -> int | None:
    """The smallest slot length in LENGTH_BUCKETS holding `tokens`; None beyond the last."""
    return next((bucket for bucket in LENGTH_BUCKETS if bucket >= tokens), None)


class Ledger:
    """What a runner's store holds (key -> signature and size), least recently used first; the runner
    holds the tensors. `capacity` bounds the sum of sizes (0 = off). Counts lookups and hits."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._items: OrderedDict[Hashable, tuple[Hashable, int]] = OrderedDict()
        self.used = self.queries = self.hits = 0

    def holds(self, key: Hashable, signature: Hashable) -> bool:
        """Is the entry of `key` there with this signature? (No count, no LRU touch.)"""
        item = self._items.get(key)
        return item is not None and item[0] == signature

    def lookup(self, key: Hashable, signature: Hashable) -> bool:
        """Is the entry of `key` there with this signature (marked as just used)?"""
        self.queries += 1
        item = self._items.get(key)
        if item is None or item[0] != signature:
            return False
        self._items.move_to_end(key)
        self.hits += 1
        return True

    def reserve(self, key: Hashable, signature: Hashable, size: int, pinned: set) -> tuple[bool, list]:
        """Make room for a new entry of `size` without evicting `pinned` keys: (stored, evicted keys)."""
        if not self.capacity or size > self.capacity:
            return False, []
        free = self.capacity - self.used + (self._items[key][1] if key in self._items else 0)
        victims = []
        for other, (_, other_size) in self._items.items():
            if free >= size:
                break
            if other != key and other not in pinned:
                victims.append(other)
                free += other_size
        if free < size:
            return False, []
        for victim in victims:
            self.discard(victim)
        self.discard(key)
        self._items[key] = (signature, size)
        self.used += size
        return True, victims

    def discard(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.used -= item[1]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class SchedulerLimits:
    capacity_tokens: int  # KV positions of the pool: rows x slot length <= this
    max_batch_size: int  # running sequences
    max_prefill_tokens: int  # prefill tokens per step (a step's first admission may exceed it)
    prefix_cache_bytes: int  # bytes of stored prefixes (0 = off)
    kv_bytes_per_token: int  # bytes one cache position holds (all layers, keys and values)
    vision_cache_size: int  # stored vision features (entries; 0 = off)


class Scheduler:
    """See the module docstring. Not thread-safe: one engine loop drives it."""

    def __init__(self, limits: SchedulerLimits, eos_token_ids: frozenset[int],
                 stop: Callable[[Sequence], bool] | None = None):
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop = stop  # extra end condition, asked after each new token (e.g. the answer holds a closed point)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # running[i] holds row i (ended ones stay until the next schedule)
        self.slot_len = 0  # the layout in force (0: none yet)
        self.prefixes = Ledger(limits.prefix_cache_bytes)
        self.visions = Ledger(limits.vision_cache_size)
        self._cancelled: list[Sequence] = []  # ended by cancel(), reported by the next schedule

    # ------------------------------------------------------------------ intake
    def fits_alone(self, need: int) -> bool:
        """Could one sequence of `need` positions ever run under the limits?"""
        slot = slot_for(need + 1)
        return slot is not None and slot <= self.limits.capacity_tokens

    def add(self, seq: Sequence) -> None:
        if seq.status is not Status.WAITING or seq.row != -1:
            raise ValueError("only a new sequence can be added")
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing runs (ended rows may still wait for the next schedule to leave)."""
        return not self.waiting and all(s.done for s in self.running)

    def cancel(self, seq: Sequence) -> None:
        """End a waiting or running sequence now (CANCELLED); the next schedule reports it and frees its row."""
        if not seq.done:
            self._end(seq, Status.CANCELLED)
            self._cancelled.append(seq)

    # ------------------------------------------------------------------ schedule
    def schedule(self, now: float) -> tuple[StepPlan, list[Sequence]]:
        """The next step and the sequences that ended without it (cancelled, expired, or never able to fit)."""
        ended, self._cancelled = self._cancelled + self._reap(now), []
        moves = self._compact()
        admitted, slot_len = self._admit(now, ended)
        prefills, evict_p, evict_v = self._prefills(admitted)
        decodes = tuple(Decode(s, s.row, s.tokens[-1], s.length, s.length + s.rope_delta) for s in self.running)
        self.running += admitted
        self.slot_len = slot_len if self.running else self.slot_len
        plan = StepPlan(slot_len=self.slot_len if self.running else 0, moves=tuple(moves),
                        evict_prefixes=tuple(evict_p), evict_visions=tuple(evict_v), prefills=tuple(prefills),
                        decodes=decodes)
        return plan, ended

    def _end(self, seq: Sequence, status: Status, error: BaseException | None = None) -> None:
        seq.status, seq.error = status, error

    def _reap(self, now: float) -> list[Sequence]:
        """End waiting and running sequences whose caller left or whose deadline passed."""
        ended = []
        for seq in self.waiting + self.running:
            if seq.done:
                continue
            if seq.deadline is not None and now >= seq.deadline:
                self._end(seq, Status.EXPIRED)
            elif seq.is_active is not None and not seq.is_active():
                self._end(seq, Status.CANCELLED)
            else:
                continue
            ended.append(seq)
        self.waiting = [s for s in self.waiting if not s.done]
        return ended

    def _compact(self) -> list[Move]:
        """Drop the ended rows; the last running sequence moves into each hole, with every position it
        has written (its length after the last update)."""
        moves, rows, hole = [], self.running, 0
        while hole < len(rows):
            if not rows[hole].done:
                hole += 1
                continue
            gone = rows[hole]
            gone.row = -1
            last = rows.pop()
            if last is gone or last.done:
                last.row = -1
                continue  # the hole was the last row, or the new last row ended too: look again
            moves.append(Move(src=last.row, dst=hole, length=last.length))
            last.row, rows[hole] = hole, last
            hole += 1
        return moves

    def _layout(self, rows: int, need: int) -> int | None:
        """The slot length for `rows` sequences whose largest need is `need`: the current one when it
        holds them, else the smallest that does; None when nothing does."""
        if rows > self.limits.max_batch_size:
            return None
        required = slot_for(need + 1)
        if required is None:
            return None
        if self.slot_len >= required and rows * self.slot_len <= self.limits.capacity_tokens:
            return self.slot_len
        return required if rows * required <= self.limits.capacity_tokens else None

    def _admit(self, now: float, ended: list[Sequence]) -> tuple[list[Sequence], int]:
        """Waiting sequences in arrival order while they fit the layout and the step's prefill budget."""
        rows, need = len(self.running), max((s.need for s in self.running), default=0)
        slot_len = self._layout(rows, need) if rows else self.slot_len
        admitted, budget, cold_keys = [], self.limits.max_prefill_tokens, set()
        reuse = self.prefixes.capacity or self.visions.capacity
        for seq in self.waiting:
            if reuse and seq.cache_key is not None and seq.cache_key in cold_keys:
                continue  # its frame's ViT and prefix run in this step: it waits to reuse them next step
            if not self.fits_alone(seq.need):
                self._end(seq, Status.FAILED, ValueError(
                    f"the prompt and answer need {seq.need} tokens of KV cache, more than the cache holds "
                    f"({self.limits.capacity_tokens} positions)"))
                ended.append(seq)
                continue
            layout = self._layout(rows + 1, max(need, seq.need))
            usable = self._prefix_usable(seq)
            hit = usable and self.prefixes.holds(seq.cache_key, seq.prefix_signature)
            tokens = seq.prompt_tokens - (seq.prefix_len if hit else 0)
            if layout is None or (admitted and tokens > budget):
                break  # first come, first served: nothing overtakes the head of the line
            if usable:
                seq.prefix_hit = self.prefixes.lookup(seq.cache_key, seq.prefix_signature)  # counted, touched
            if not hit and seq.cache_key is not None:
                cold_keys.add(seq.cache_key)
            admitted.append(seq)
            rows, need, slot_len, budget = rows + 1, max(need, seq.need), layout, budget - tokens
        taken = set(map(id, admitted))
        self.waiting = [s for s in self.waiting if id(s) not in taken and not s.done]
        for i, seq in enumerate(admitted):
            seq.status, seq.row, seq.admitted_at = Status.RUNNING, len(self.running) + i, now
        return admitted, slot_len

    def _prefix_usable(self, seq: Sequence) -> bool:
        """Could this sequence start from a stored prefix at all (key, signature, an image, cache on)?"""
        return (seq.cache_key is not None and seq.prefix_signature is not None and seq.prefix_len > 0
                and self.prefixes.capacity > 0)

    def _prefills(self, admitted: list[Sequence]) -> tuple[list[Prefill], list, list]:
        """The admitted sequences' prefills with their store decisions (LRU evictions never take an
        entry this step uses)."""
        pinned_p = {s.cache_key for s in admitted if s.prefix_hit}
        pinned_v = set()
        vision_keys = {}
        for seq in admitted:
            key = seq.cache_key
            if key is None or seq.prefix_hit or seq.has_vision or not self.visions.capacity:
                continue
            if key in self.visions and self.visions.lookup(key, seq.vision_signature):
                vision_keys[id(seq)] = key
                pinned_v.add(key)
        prefills, evict_p, evict_v = [], [], []
        for seq in admitted:
            key, store_p, store_v = seq.cache_key, None, None
            cold = not seq.prefix_hit and key is not None
            if cold and seq.prefix_signature is not None and seq.prefix_len > 0:
                size = seq.prefix_len * self.limits.kv_bytes_per_token
                stored, victims = self.prefixes.reserve(key, seq.prefix_signature, size, pinned_p)
                store_p, evict_p = (key if stored else None), evict_p + victims
                pinned_p.add(key)  # stored by this step: a later reservation of the step must not evict it
            if cold and not seq.has_vision and id(seq) not in vision_keys and seq.vision_signature is not None:
                stored, victims = self.visions.reserve(key, seq.vision_signature, 1, pinned_v)
                store_v, evict_v = (key if stored else None), evict_v + victims
                pinned_v.add(key)
            seq.vision_hit = seq.prefix_hit or seq.has_vision or id(seq) in vision_keys
            prefills.append(Prefill(seq=seq, row=seq.row, prefix_key=key if seq.prefix_hit else None,
                                    vision_key=vision_keys.get(id(seq)), store_prefix_key=store_p,
                                    store_vision_key=store_v))
        return prefills, evict_p, evict_v

    # ------------------------------------------------------------------ update
    def update(self, plan: StepPlan, result: StepResult) -> list[Sequence]:
        """Take the step's tokens and errors; return the sequences that ended in it (they leave their rows at
        the next schedule)."""
        ended = []
        for item, out in zip(plan.prefills, result.prefills):
            seq = out.seq
            if not out.prefix_stored and item.store_prefix_key is not None:
                self.prefixes.discard(item.store_prefix_key)
            if not out.vision_stored and item.store_vision_key is not None:
                self.visions.discard(item.store_vision_key)
            seq.vit_start, seq.vit_end, seq.prefill_start = out.vit_start, out.vit_end, out.prefill_start
            seq.first_token_at, seq.vision, seq.rope_delta = out.first_token_at, out.vision, out.rope_delta
            seq.vision_hit = seq.vision_hit or out.vision_reused
            if out.error is None:
                seq.length = seq.prompt_tokens
            self._take(seq, out, ended)
        for out in result.decodes:
            if out.error is None:
                out.seq.length += 1
            self._take(out.seq, out, ended)
        return ended

    def _take(self, seq: Sequence, out: SeqResult, ended: list[Sequence]) -> None:
        if seq.done:  # ended meanwhile (cannot happen within one loop; kept for safety of callers)
            return
        if out.error is not None:
            self._end(seq, Status.FAILED, out.error)
        else:
            seq.tokens.append(int(out.token))
            seq.logprob += float(out.logprob)
            if (seq.tokens[-1] in self.eos_token_ids or len(seq.tokens) >= seq.budget
                    or (self.stop is not None and self.stop(seq))):
                self._end(seq, Status.FINISHED)
        if seq.done:
            ended.append(seq)

    def cancel_all(self, error: BaseException) -> list[Sequence]:
        """Fail every waiting and running sequence (the loop is stopping or broke)."""
        live = [s for s in self.waiting + self.running if not s.done]
        for seq in live:
            self._end(seq, Status.FAILED, error)
        ended, self._cancelled, self.waiting = self._cancelled + live, [], []
        return ended

    def reset(self) -> None:
        """Forget the running rows and the stores' bookkeeping (after cancel_all, when a step broke)."""
        for seq in self.running:
            seq.row = -1
        self.running = []
        self.prefixes = Ledger(self.limits.prefix_cache_bytes)
        self.visions = Ledger(self.limits.vision_cache_size)

    # ------------------------------------------------------------------ invariants
    def check(self) -> None:
        """AssertionError when an invariant of the module docstring does not hold."""
        live = [s for s in self.running if not s.done]
        assert len(self.running) <= self.limits.max_batch_size, "more rows than max_batch_size"
        if self.running:
            assert len(self.running) * self.slot_len <= self.limits.capacity_tokens, "rows exceed the pool"
        for row, seq in enumerate(self.running):
            assert seq.row == row, f"sequence in row {row} thinks it is in row {seq.row}"
            assert seq.need + 1 <= self.slot_len, f"need {seq.need} does not fit slots of {self.slot_len}"
            assert seq.length < self.slot_len, "written past the slot"
        assert all(s.status is Status.WAITING for s in self.waiting), "an ended sequence still waits"
        assert len({id(s) for s in live + self.waiting}) == len(live) + len(self.waiting), "a sequence twice"
