"""The engine's runner: it owns the device — the model, the KV slots, the stored prefixes and vision
features, the CUDA graphs — and executes one `StepPlan` at a time, returning a `StepResult`.

    result = runner.execute(plan)   # moves, layout, evictions, prefill, decode; plain results back

Every decision (who runs, which row, what is stored or evicted) was the scheduler's; the
runner only carries it out, in the order the plan defines (`pixelprune.model.scheduler`):
compaction moves copy every position the moved sequence has written; prefills run the ViT
once for all cold images that need it (one attention segment per image), then one
right-padded extend forward for all admitted rows; then one decode token for the rows that
were running. Faults stay with their sequence: an image whose ViT fails, or a row whose
prefill fails, is retried alone (halves, down to one), so only the failing one gets the
error. A retry after running out of device memory happens after the failed forward's
tensors are released.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np
import torch

from pixelprune.model.adapter import VisionFeatures
from pixelprune.model.attention import use_slot_attention
from pixelprune.model.generation import (Chunk, DecodeGraphs, Prompt, decode_kv_len, decode_step, extend, greedy,
                                         prompt_chunk, prompt_from_chat)
from pixelprune.model.kvcache import SlotKVCache
from pixelprune.model.prefix import PrefixEntry
from pixelprune.model.scheduler import LENGTH_BUCKETS
from pixelprune.model.step import Decode, Prefill, SeqResult, StepPlan, StepResult

log = logging.getLogger(__name__)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # decode batch sizes captured as CUDA graphs


@dataclass(frozen=True)
class Work:
    """What the runner needs of one request (the scheduler's `Sequence.payload`)."""

    prepared: object  # pixelprune.model.pipeline.PreparedImage
    ids: np.ndarray  # chat token ids with one <|image_pad|>
    pad: int  # index of the <|image_pad|> in ids
    vision: VisionFeatures | None = None  # features given by the caller (no ViT)
    instruction: str = ""  # what was asked (for logs and tests)


@dataclass
class _Item:
    """One prefill in flight."""

    plan: Prefill
    work: Work
    vision: VisionFeatures | None = None
    vision_reused: bool = False
    vit_marks: tuple = ()  # (start, end) StageClock marks of the ViT call it was part of
    prompt: Prompt | None = None
    entry: PrefixEntry | None = None
    error: BaseException | None = None
    result: dict = field(default_factory=dict)


class StageClock:
    """Points in time of the work queued on the device: CUDA events on a GPU (recorded without waiting, read
    once the step's tokens are on the host), the host's monotonic clock on a CPU. `place` puts a mark on
    the host's clock, given the host time at which a later mark's work was known to be done."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.monotonic()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def place(self, mark, anchor, anchor_at: float) -> float:
        """The host time of `mark`, knowing `anchor` (a later mark) completed at host time anchor_at."""
        if not self.cuda:
            return mark
        return anchor_at - mark.elapsed_time(anchor) / 1000.0


def _released(exc: BaseException) -> BaseException:
    """An out-of-memory error without its traceback (whose frames hold the failed forward's tensors)."""
    return exc.with_traceback(None) if isinstance(exc, torch.OutOfMemoryError) else exc


def _runs(items: list[_Item]) -> list[list[_Item]]:
    """Items split where their rows stop being consecutive (an extend forward runs on a contiguous range)."""
    runs: list[list[_Item]] = []
    for item in items:
        if runs and runs[-1][-1].plan.row + 1 == item.plan.row:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


class ModelRunner:
    """Executes plans on one model; see the module docstring. Driven by one thread."""

    def __init__(self, model, processor, encode, capacity_tokens: int, cuda_graphs: bool = True):
        # encode(list of PreparedImage) -> list of VisionFeatures: one ViT call, no waiting on the device
        self.model, self.processor, self.encode = model, processor, encode
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.capacity_tokens = capacity_tokens  # positions of the KV pool, allocated on first use
        self._cache: SlotKVCache | None = None
        self.clock = StageClock(self.device)
        self.prefixes: dict[Hashable, PrefixEntry] = {}
        self.visions: dict[Hashable, VisionFeatures] = {}
        use_slot_attention(model)  # prefill attention per row, over its own positions only
        self._step_fn = lambda inputs, kv_len: decode_step(model, self.cache, inputs, kv_len)
        on_cuda = self.device.type == "cuda" and cuda_graphs
        self.graphs = DecodeGraphs(self._step_fn, lambda: self.cache.slot_len) if on_cuda else None

    @property
    def cache(self) -> SlotKVCache:
        """The KV pool, allocated on first use: by the thread that drives the engine, so that on a CPU the
        pool's parallel fill does not start a second OpenMP team in the caller's thread (an idle team of
        another thread slows every later torch op ~2x on a small machine)."""
        if self._cache is None:
            cfg = self.model.config.text_config
            self._cache = SlotKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                      self.capacity_tokens, self.device, self.dtype)
        return self._cache

    @property
    def pool_bytes(self) -> int:
        """The KV pool's bytes on the device; 0 while it is not allocated."""
        return self._cache.nbytes if self._cache is not None else 0

    @property
    def prefix_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.prefixes.values())

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ a step
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        for move in plan.moves:
            self.cache.move(move.src, move.dst, move.length)
        if plan.slot_len and plan.slot_len != self.cache.slot_len:
            self.cache.relayout(plan.slot_len, len(plan.decodes), max((d.position for d in plan.decodes), default=0))
        for key in plan.evict_prefixes:
            self.prefixes.pop(key, None)
        for key in plan.evict_visions:
            self.visions.pop(key, None)
        prefills = self._prefill(plan.prefills) if plan.prefills else ()
        eager_before = self.graphs.eager_steps if self.graphs is not None else 0
        decodes, decode_s = self._decode(plan.decodes) if plan.decodes else ((), 0.0)
        eager = (self.graphs.eager_steps - eager_before) if self.graphs is not None else 0
        return StepResult(prefills=prefills, decodes=decodes, decode_s=decode_s, eager_steps=eager,
                          graphs=len(self.graphs) if self.graphs is not None else 0)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, plans: tuple[Prefill, ...]) -> tuple[SeqResult, ...]:
        items = [_Item(plan=p, work=p.seq.payload) for p in plans]
        self._vision(items)
        for item in items:
            if item.error is None:
                try:
                    item.result["chunk"] = self._chunk(item)
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    item.error = exc
        ready = [i for i in items if i.error is None]
        for item in ready:
            if item.entry is not None:
                self.cache.write(item.plan.row, item.entry.kv)
        if ready:
            start = self.clock.mark()
            outcomes = [o for run in _runs(ready) for o in self._forward(run)]
            logits = [o for o in outcomes if isinstance(o, torch.Tensor)]
            picked = greedy(torch.stack(logits)) if logits else None
            end = self.clock.mark()
            firsts = iter(zip(picked[0].tolist(), picked[1].tolist()) if picked else [])  # waits for the device
            done_at = time.monotonic()
            for item, outcome in zip(ready, outcomes):
                if isinstance(outcome, BaseException):
                    item.error = outcome
                else:
                    item.result.update(zip(("token", "logprob"), next(firsts)),
                                       start=self.clock.place(start, end, done_at), at=done_at,
                                       vit=tuple(self.clock.place(m, end, done_at) for m in item.vit_marks))
        return tuple(self._finish(item) for item in items)

    def _vision(self, items: list[_Item]) -> None:
        """Features for every cold item: given, stored, or one ViT call for all that need it."""
        need = []
        for item in items:
            plan, work = item.plan, item.work
            if plan.prefix_key is not None:
                item.entry = self.prefixes.get(plan.prefix_key)
                if item.entry is None:
                    item.error = RuntimeError("the scheduler planned a prefix the runner does not hold")
            elif work.vision is not None:
                item.vision, item.vision_reused = work.vision, True
            elif plan.vision_key is not None and plan.vision_key in self.visions:
                item.vision, item.vision_reused = self.visions[plan.vision_key], True
            else:
                need.append(item)
        self._encode(need)

    def _encode(self, items: list[_Item]) -> None:
        """One ViT call for all; if it raises, one call each so that only the failing ones fail."""
        if not items:
            return
        try:
            for item in items:  # the rows (built on first use: timings.patchify) before the ViT's clock starts
                item.work.prepared.pixel_values
            start = self.clock.mark()
            features = self.encode([item.work.prepared for item in items])
            end = self.clock.mark()
        except Exception as exc:  # noqa: BLE001 - retried one by one
            if len(items) == 1:
                items[0].error = _released(exc)
                return
            for item in items:
                self._encode([item])
            return
        for item, vision in zip(items, features):
            item.vision, item.vit_marks = vision, (start, end)

    def _chunk(self, item: _Item) -> Chunk:
        """The tokens this item's prefill runs: the rest after a stored prefix, or the whole prompt."""
        work = item.work
        if item.entry is not None:
            rest = torch.from_numpy(work.ids[work.pad + 1:].copy()).to(self.device)
            steps = torch.arange(rest.shape[0], device=self.device)
            mrope = item.entry.next_mrope + steps
            return Chunk(token_ids=rest, positions=torch.stack((item.entry.length + steps, mrope, mrope, mrope)),
                         start=item.entry.length)
        item.prompt = prompt_from_chat(self.model, work.ids, [work.prepared.image_grid_thw], [work.prepared.keep],
                                       self.device)
        if item.prompt.length != item.plan.seq.prompt_tokens:
            raise ValueError(f"the prompt has {item.prompt.length} tokens, {item.plan.seq.prompt_tokens} were planned")
        return prompt_chunk(item.prompt, item.vision)

    def _forward(self, items: list[_Item]) -> list:
        """Last-token logits per item, or the exception its prefill raised; a failing batch is split in
        halves and retried once the failed forward's tensors are gone."""
        error = None
        try:
            return list(extend(self.model, self.cache, items[0].plan.row, [i.result["chunk"] for i in items]))
        except Exception as exc:  # noqa: BLE001
            error = _released(exc)
        if isinstance(error, torch.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(items) == 1:
            return [error]
        half = len(items) // 2
        return self._forward(items[:half]) + self._forward(items[half:])

    def _finish(self, item: _Item) -> SeqResult:
        """The item's result; on success, its prefix and vision features stored as planned."""
        plan, seq = item.plan, item.plan.seq
        if item.error is not None:
            return SeqResult(seq=seq, error=item.error, vision_reused=item.vision_reused)
        if item.entry is not None:
            delta = item.entry.next_mrope - item.entry.length
        else:
            delta = item.prompt.end_mrope - item.prompt.length
        stored_p = stored_v = False
        if plan.store_prefix_key is not None and item.prompt is not None and item.prompt.prefix_len:
            length = item.prompt.prefix_len
            self.prefixes[plan.store_prefix_key] = PrefixEntry(
                kv=self.cache.read(plan.row, length), length=length, next_mrope=item.prompt.prefix_mrope)
            stored_p = True
        if plan.store_vision_key is not None and item.vision is not None:
            self.visions[plan.store_vision_key] = item.vision
            stored_v = True
        vit_start, vit_end = item.result["vit"] or (0.0, 0.0)  # (): features given, stored or reused
        return SeqResult(seq=seq, token=item.result["token"], logprob=item.result["logprob"], rope_delta=delta,
                         vit_start=vit_start, vit_end=vit_end, prefill_start=item.result["start"],
                         vision_reused=item.vision_reused or item.entry is not None,
                         prefix_stored=stored_p, vision_stored=stored_v, first_token_at=item.result["at"],
                         vision=item.vision)

    # ------------------------------------------------------------------ decode
    def _decode(self, decodes: tuple[Decode, ...]) -> tuple[tuple[SeqResult, ...], float]:
        start = time.perf_counter()
        error = None
        try:
            tokens, logprobs = self._decode_rows(decodes)
        except Exception as exc:  # noqa: BLE001 - a failed step fails the sequences in it, not the process
            error = _released(exc)
        if error is not None:
            if isinstance(error, torch.OutOfMemoryError) and self.device.type == "cuda":
                torch.cuda.empty_cache()
            return tuple(SeqResult(seq=d.seq, error=error) for d in decodes), time.perf_counter() - start
        return (tuple(SeqResult(seq=d.seq, token=t, logprob=lp) for d, t, lp in zip(decodes, tokens, logprobs)),
                time.perf_counter() - start)

    def _decode_rows(self, decodes: tuple[Decode, ...]) -> tuple[list[int], list[float]]:
        n = rows = len(decodes)
        if self.graphs is not None:
            rows = min(next(b for b in ROW_BUCKETS + (n,) if b >= n), self.cache.slots)
        pad, last = rows - n, self.cache.slot_len - 1
        columns = [[d.token for d in decodes] + [0] * pad, [d.position for d in decodes] + [last] * pad,
                   [d.mrope for d in decodes] + [0] * pad]
        inputs = torch.tensor(columns, dtype=torch.long, device=self.device)
        kv_len = decode_kv_len(max(d.position for d in decodes) + 1, self.cache.slot_len)
        step = self.graphs if self.graphs is not None else self._step_fn
        tokens, logprobs = step(inputs, kv_len)
        return tokens[:n].tolist(), logprobs[:n].tolist()

    @torch.inference_mode()
    def capture_graphs(self, max_batch_size: int, max_slot_len: int = 8192) -> int:
        """With CUDA graphs on and nothing running: capture the decode step for every rows bucket and slot
        length (up to max_slot_len) the limits allow, so serving does not pay for captures. Returns the
        number of graphs held."""
        if self.graphs is None:
            return 0
        for slot in (s for s in LENGTH_BUCKETS if s <= min(max_slot_len, self.cache.capacity_tokens)):
            self.cache.set_layout(slot)
            for rows in ROW_BUCKETS:
                if rows > self.cache.slots or (rows > 1 and rows // 2 >= max_batch_size):
                    break
                inputs = torch.zeros((3, rows), dtype=torch.long, device=self.device)
                inputs[1] = slot - 1  # the position no sequence uses
                self.graphs(inputs, slot)
        return len(self.graphs)
