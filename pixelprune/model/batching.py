"""Continuous batching of grounding requests on one model: admit, step, cancel.

    scheduler.admit([request, ...])  -> a Sequence per request taken (the rest wait: limits)
    scheduler.step()                 -> StepReport: the sequences that finished, batch size, seconds

`admit` prefills new requests together into free cache rows (after the ViT, which runs
once per frame: features given, cached per key, or shared by requests on the same new
frame; or not at all when the prompt prefix is cached) and picks their first token; `step`
decodes one token for every running sequence. Requests join between steps. A sequence ends
on an end-of-turn token, at its budget, or (with `stop_after_point`) once its text holds a
closed point; it leaves the batch at once and its row is refilled by the last one.

Faults stay with their request: one that cannot be prepared fails alone; a batched prefill
that raises (a bug in one input, or device memory running out) is split in halves and
retried down to single requests, so only the request that cannot run fails. Limits:
`max_batch_size` rows and `max_batch_tokens` cache positions (rows x slot length), checked
before a request joins. transformers' own continuous batching (`ContinuousBatchingManager`,
5.24) is not used: it feeds token ids with one row of positions `range(past, past + q)`,
so it takes neither visual features nor Qwen3-VL's 4-row MRoPE positions, which after
pruning differ from the token indices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pixelprune.model.generation import DecodeGraphs, decode_step, extend
from pixelprune.model.kvcache import LENGTH_BUCKETS, SlotKVCache, length_bucket
from pixelprune.model.prefix import BoundedLRU, PrefixEntry
from pixelprune.model.request import BatchSettings, GroundRequest
from pixelprune.model.sequence import Sequence, lookup_prefix, plan, vision_for_cold

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # decode batch sizes captured as CUDA graphs


@dataclass(frozen=True)
class StepReport:
    finished: list  # Sequences that ended (output or error set), in the order they ended
    batch_size: int  # sequences decoded in this step (0: nothing was running)
    seconds: float  # wall time of the step
    kv_bytes: int = 0  # key/value bytes the running sequences hold after the step


class BatchScheduler:
    """The running batch of one engine; not thread-safe (one model thread drives it)."""

    def __init__(self, engine, settings: BatchSettings = BatchSettings()):
        self.engine, self.settings = engine, settings
        self.running: list[Sequence] = []  # row i of the cache holds running[i]
        self._ended: list[Sequence] = []  # ended during admit; reported by the next step
        self.cache: SlotKVCache | None = None  # allocated on first use
        self.prefixes: BoundedLRU[PrefixEntry] = BoundedLRU(settings.prefix_cache_bytes, size=lambda e: e.nbytes)
        self.visions = BoundedLRU(settings.vision_cache_size)
        on_cuda = engine.device.type == "cuda" and settings.cuda_graphs
        self._step_fn = lambda inputs: decode_step(engine.model, self.cache, inputs)
        self.graphs = DecodeGraphs(self._step_fn, lambda: self.cache.slot_len) if on_cuda else None

    @property
    def idle(self) -> bool:
        return not self.running and not self._ended

    def check_size(self, need: int) -> None:
        """ValueError when one sequence of `need` positions could never run under the limits (its slot, the
        length bucket above need, exceeds max_batch_tokens)."""
        slot = next((b for b in LENGTH_BUCKETS if b > need), None)
        if slot is None or slot > self.settings.max_batch_tokens:
            raise ValueError(f"the prompt and answer need {need} tokens of KV cache, more than this server's "
                             f"limit allows ({self.settings.max_batch_tokens}, --max-batch-tokens); send a smaller "
                             "screenshot or enable pruning")

    # ------------------------------------------------------------------ admission
    @torch.inference_mode()
    def admit(self, requests: list[GroundRequest]) -> list[Sequence]:
        """Take requests in order while they fit; prefill them. Returns one Sequence per request taken
        (requests[len(result):] did not fit now). A Sequence that failed is reported by the next step."""
        started = time.perf_counter()
        taken: list[Sequence] = []
        for request in requests:
            seq = Sequence(request, started)
            try:
                plan(self.engine, self, seq)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                self._end(seq, error=exc)
                taken.append(seq)
                continue
            if not self._fits([s for s in taken if not s.done] + [seq]):
                break
            taken.append(seq)
        firsts, follows, cold_keys = [], [], set()
        for seq in (s for s in taken if not s.done):
            key = seq.request.cache_key
            cold = seq.entry is None and key is not None
            (follows if cold and key in cold_keys and self.prefixes.capacity else firsts).append(seq)
            if cold:
                cold_keys.add(key)
        self._prefill(firsts)
        for seq in follows:  # requests on a frame first seen in this batch: its prefix is stored now
            lookup_prefix(self.engine, self, seq)
        self._prefill(follows)
        return taken

    def _fits(self, new: list[Sequence]) -> bool:
        every = self.running + new
        rows, slot = len(every), length_bucket(max(s.need for s in every) + 1)
        return rows <= self.settings.max_batch_size and rows * slot <= self.settings.max_batch_tokens

    def _ensure_cache(self) -> SlotKVCache:
        if self.cache is None:
            cfg = self.engine.model.config.text_config
            self.cache = SlotKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                     self.settings.max_batch_tokens, self.engine.device, self.engine.dtype)
        return self.cache

    def _layout_for(self, new: list[Sequence]) -> None:
        self._ensure_cache()
        slot = length_bucket(max(s.need for s in self.running + new) + 1)
        if not self.running:
            self.cache.set_layout(slot)
        elif slot > self.cache.slot_len:
            self.cache.relayout(slot, len(self.running), max(s.length for s in self.running))

    def _prefill(self, seqs: list[Sequence]) -> None:
        seqs = [s for s in seqs if not s.done]
        if not seqs:
            return
        self._layout_for(seqs)
        for seq, exc in vision_for_cold(self.engine, self, seqs):
            self._end(seq, error=exc)
        chunks, ok = [], []
        for seq in (s for s in seqs if not s.done):
            try:
                chunks.append(seq.make_chunk(self.engine))
                ok.append(seq)
            except Exception as exc:  # noqa: BLE001
                self._end(seq, error=exc)
        if not ok:
            return
        base = len(self.running)
        for i, seq in enumerate(ok):
            seq.row = base + i
            if seq.entry is not None:
                self.cache.write(seq.row, seq.entry.kv)
        self.engine.sync()
        start = time.perf_counter()
        results = self._forward(base, ok, chunks)
        logits = [r for r in results if isinstance(r, torch.Tensor)]
        firsts = iter(torch.stack(logits).argmax(-1).tolist() if logits else [])
        tokens = [next(firsts) if isinstance(r, torch.Tensor) else r for r in results]
        seconds = time.perf_counter() - start
        for seq, token in zip(ok, tokens):
            if isinstance(token, BaseException):
                self._end(seq, error=token)
                continue
            seq.started_decoding(token, seconds, time.perf_counter())
            seq.store_prefix(self)
        self._settle(ok)

    def _forward(self, first_row: int, seqs: list[Sequence], chunks: list) -> list:
        """Logits (rows, vocab) per sequence, or the exception that sequence's prefill raised; a failing
        batch is split in halves and retried (device memory, or one bad input)."""
        try:
            return list(extend(self.engine.model, self.cache, first_row, chunks))
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, torch.OutOfMemoryError) and self.engine.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(seqs) == 1:
                return [exc]
            half = len(seqs) // 2
            return (self._forward(first_row, seqs[:half], chunks[:half])
                    + self._forward(first_row + half, seqs[half:], chunks[half:]))

    def _settle(self, seqs: list[Sequence]) -> None:
        """After a prefill: compact the successful rows after the running ones; end the finished."""
        for seq in seqs:
            if seq.done:
                continue
            row = len(self.running)
            if seq.row != row:
                self.cache.move(seq.row, row, seq.length)
                seq.row = row
            self.running.append(seq)
            if seq.finished(self.engine, self.settings.stop_after_point):
                self._end(seq)

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def step(self) -> StepReport:
        """Decode one token for every running sequence; report the sequences that ended since the last step."""
        start = time.perf_counter()
        n = len(self.running)
        if n:
            try:
                tokens = self._decode(n)
            except Exception as exc:  # noqa: BLE001 - a failed step fails the sequences in it, not the process
                if isinstance(exc, torch.OutOfMemoryError) and self.engine.device.type == "cuda":
                    torch.cuda.empty_cache()
                for seq in list(self.running):
                    self._end(seq, error=exc)
                tokens = []
            for seq, token in zip(list(self.running), tokens):
                seq.advance(token)
                if seq.finished(self.engine, self.settings.stop_after_point):
                    self._end(seq)
        ended, self._ended = self._ended, []
        held = sum(s.length for s in self.running) * self.engine.kv_bytes_per_token
        return StepReport(finished=ended, batch_size=n, seconds=time.perf_counter() - start, kv_bytes=held)

    def _decode(self, n: int) -> list[int]:
        rows = n
        if self.graphs is not None:
            rows = min(next(b for b in ROW_BUCKETS + (n,) if b >= n), self.cache.slots)
        last = self.cache.slot_len - 1
        pad = rows - n
        columns = [[s.tokens[-1] for s in self.running] + [0] * pad,
                   [s.length for s in self.running] + [last] * pad,
                   [s.mrope for s in self.running] + [0] * pad]
        inputs = torch.tensor(columns, dtype=torch.long, device=self.engine.device)
        out = self.graphs(inputs) if self.graphs is not None else self._step_fn(inputs)
        return out[:n].tolist()

    @torch.inference_mode()
    def capture_graphs(self, max_slot_len: int = 8192) -> int:
        """With CUDA graphs on and the batch idle: capture the decode step for every rows bucket and slot
        length (up to max_slot_len) the limits allow, so serving does not pay for captures. Returns the
        number of graphs held."""
        if self.graphs is None or not self.idle:
            return 0
        cache = self._ensure_cache()
        for slot in (s for s in LENGTH_BUCKETS if s <= min(max_slot_len, cache.capacity_tokens)):
            cache.set_layout(slot)
            for rows in ROW_BUCKETS:
                if rows > cache.slots or (rows > 1 and rows // 2 >= self.settings.max_batch_size):
                    break
                inputs = torch.zeros((3, rows), dtype=torch.long, device=self.engine.device)
                inputs[1] = slot - 1  # the position no sequence uses
                self.graphs(inputs)
        return len(self.graphs)

    @torch.inference_mode()
    def cancel(self, seq: Sequence) -> None:
        """Remove a sequence (deadline passed, caller gone); it gets no output."""
        if seq in self._ended:
            self._ended.remove(seq)
        elif seq in self.running:
            self._release(seq)
        seq.done = True

    def _end(self, seq: Sequence, error: BaseException | None = None) -> None:
        if seq in self.running:
            self._release(seq)
        seq.end(self.engine, error)
        self._ended.append(seq)

    def _release(self, seq: Sequence) -> None:
        """Take seq's row out of the batch; the last running sequence moves into it."""
        row, last = self.running.index(seq), self.running[-1]
        if last is not seq:
            self.cache.move(last.row, row, last.length)
            last.row = row
            self.running[row] = last
        self.running.pop()
        seq.row = -1
