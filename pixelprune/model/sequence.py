"""One request's life in the batch: planned (tokens, sizes, reuse), prefilled, decoded, ended.

`plan` reads the request: prompt text and token ids, the KV positions it needs, the
vision features it brings, and a usable cached prefix. `vision_for_cold` gives every
request without a cached prefix its vision features, running the ViT once for all of
them that need it (one call, one attention segment per image). `Sequence.make_chunk` is
what its prefill runs: the whole prompt, or only the tokens after a cached prefix, whose
positions continue from the prefix's stored offsets. `Sequence.end` builds the
`GroundingOutput`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pixelprune.model.adapter import VisionFeatures
from pixelprune.model.generation import Chunk, build_prompt, prompt_chunk
from pixelprune.model.pipeline import image_token_id, tokenize
from pixelprune.model.positions import same_masks
from pixelprune.model.prefix import PrefixEntry
from pixelprune.model.request import GroundingOutput, GroundRequest


class Sequence:
    """A request in the batch (the engine's handle for it). `done` once it ended; then `output` or
    `error` is set (neither after `cancel`)."""

    def __init__(self, request: GroundRequest, admitted_at: float):
        self.request = request
        self.admitted_at = admitted_at  # perf_counter when admission began
        self.budget = 0  # new tokens allowed
        self.ids: np.ndarray | None = None  # chat token ids (one <|image_pad|>)
        self.prompt_tokens = 0  # tokens of the pruned prompt
        self.need = 0  # cache positions it may use: prompt + budget
        self.entry: PrefixEntry | None = None  # usable cached prefix
        self.vision: VisionFeatures | None = request.vision
        self.vision_reused = request.vision is not None
        self.vit_s = 0.0
        self.prompt = None  # the Prompt built for a cold prefill (kept until its prefix is stored)
        self.row = -1  # cache row while running
        self.length = 0  # cache positions holding this sequence
        self.mrope = 0  # MRoPE position of the next token fed
        self.tokens: list[int] = []
        self.prefill_s = 0.0
        self.first_at = 0.0
        self.done = False
        self.output: GroundingOutput | None = None
        self.error: BaseException | None = None

    @property
    def prefix_reused(self) -> bool:
        return self.entry is not None

    def make_chunk(self, engine) -> Chunk:
        """The tokens this sequence's prefill runs."""
        prepared = self.request.prepared
        if self.entry is not None:
            pad = int(np.flatnonzero(self.ids == image_token_id(engine.processor))[0])
            rest = torch.from_numpy(self.ids[pad + 1:].copy()).to(engine.device)
            steps = torch.arange(rest.shape[0], device=engine.device)
            mrope = self.entry.next_mrope + steps
            positions = torch.stack((self.entry.length + steps, mrope, mrope, mrope))
            return Chunk(token_ids=rest, positions=positions, start=self.entry.length)
        full = tokenize(engine.processor, None, [prepared.image_grid_thw], device=engine.device, ids=self.ids)
        self.prompt = build_prompt(engine.model, full["input_ids"], [prepared.image_grid_thw], [prepared.keep])
        return prompt_chunk(self.prompt, self.vision)

    def started_decoding(self, token: int, prefill_s: float, now: float) -> None:
        """The prefill gave the first token."""
        self.tokens = [int(token)]
        self.prefill_s, self.first_at = prefill_s, now
        self.length = self.prompt_tokens
        if self.entry is not None:
            self.mrope = self.entry.next_mrope + (self.prompt_tokens - self.entry.length)
        else:
            self.mrope = int(self.prompt.positions[1, -1]) + 1

    def store_prefix(self, scheduler) -> None:
        """After a cold prefill with a cache key: keep the prefix's keys and values."""
        key, prompt = self.request.cache_key, self.prompt
        if key is None or prompt is None or not prompt.prefix_len:
            return
        if prompt.prefix_len * scheduler.engine.kv_bytes_per_token > scheduler.prefixes.capacity:
            return  # would not fit the store even alone
        prepared = self.request.prepared
        pad = int(np.flatnonzero(self.ids == image_token_id(scheduler.engine.processor))[0])
        entry = PrefixEntry(kv=scheduler.cache.read(self.row, prompt.prefix_len), length=prompt.prefix_len,
                            next_mrope=int(prompt.positions[1, prompt.prefix_len]),
                            text_ids=tuple(int(i) for i in self.ids[:pad]), grids=(tuple(prepared.image_grid_thw),),
                            kept_blocks=(prepared.kept_blocks,))
        scheduler.prefixes.put(key, entry)
        self.prompt = None

    def advance(self, token: int) -> None:
        """One decode step fed tokens[-1] and produced `token`."""
        self.tokens.append(int(token))
        self.length += 1
        self.mrope += 1

    def finished(self, engine, stop_after_point: bool) -> bool:
        if self.tokens[-1] in engine.eos_token_ids or len(self.tokens) >= self.budget:
            return True
        if not stop_after_point:
            return False
        prepared, text = self.request.prepared, engine.processor.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return engine.profile.point(text, prepared.resized_size, prepared.original_size, partial=True) is not None

    def end(self, engine, error: BaseException | None = None) -> None:
        self.done, self.error, self.prompt = True, error, None
        if error is None:
            self.output = self._output(engine, time.perf_counter())

    def _output(self, engine, now: float) -> GroundingOutput:
        prepared = self.request.prepared
        raw_text = engine.processor.tokenizer.decode(self.tokens, skip_special_tokens=True)
        found = engine.profile.point(raw_text, prepared.resized_size, prepared.original_size)
        prep_s = prepared.prepare_s  # the caller's thread; a lazy patchify is inside the window below
        return GroundingOutput(
            raw_text=raw_text, point=None if found is None else found.pixels,
            point_normalized=None if found is None else found.normalized,
            kept_blocks=prepared.kept_blocks, total_blocks=prepared.total_blocks,
            retain_ratio=prepared.kept_blocks / prepared.total_blocks,
            kv_cache_bytes=self.prompt_tokens * engine.kv_bytes_per_token, vision=self.vision,
            timings={**prepared.timings, "vit": self.vit_s, "prefill": self.prefill_s,
                     "decode_tokens": now - self.first_at, "ttft": prep_s + (self.first_at - self.admitted_at)},
            vision_reused=self.vision_reused or self.prefix_reused, generated_tokens=len(self.tokens),
            prefix_reused=self.prefix_reused)


def plan(engine, scheduler, seq: Sequence) -> None:
    """Read the request (ValueError for bad input or one that can never fit) and look up its prefix."""
    request = seq.request
    seq.budget = engine.max_new_tokens if request.max_new_tokens is None else int(request.max_new_tokens)
    if seq.budget < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {seq.budget}")
    seq.ids = engine.prompt_ids(engine.profile.prompt(request.instruction, request.prompt))
    prepared = request.prepared
    if int((seq.ids == image_token_id(engine.processor)).sum()) != 1:
        raise ValueError("the prompt must hold exactly one image placeholder")
    seq.prompt_tokens = len(seq.ids) - 1 + prepared.kept_blocks
    seq.need = seq.prompt_tokens + seq.budget
    scheduler.check_size(seq.need)
    if request.vision is not None and not vision_matches(request.vision, prepared):
        raise ValueError("vision features were computed for other pixels or another keep mask")
    lookup_prefix(engine, scheduler, seq)


def vision_matches(vision: VisionFeatures, prepared) -> bool:
    """The features are of one image with this grid and keep mask."""
    return (tuple(vision.image_grid_thw) == (tuple(prepared.image_grid_thw),)
            and same_masks(list(vision.keep), [prepared.keep]))


def lookup_prefix(engine, scheduler, seq: Sequence) -> None:
    """Set seq.entry to the cached prefix of its key when that prefix is this prompt's."""
    key, prepared = seq.request.cache_key, seq.request.prepared
    seq.entry = None
    if key is None or not scheduler.prefixes.capacity:
        return
    entry = scheduler.prefixes.get(key)
    if entry is None:
        return
    pad = int(np.flatnonzero(seq.ids == image_token_id(engine.processor))[0])
    if (entry.text_ids == tuple(int(i) for i in seq.ids[:pad]) and entry.grids == (tuple(prepared.image_grid_thw),)
            and entry.kept_blocks == (prepared.kept_blocks,)):
        seq.entry = entry


def vision_for_cold(engine, scheduler, seqs: list[Sequence]) -> list[tuple[Sequence, BaseException]]:
    """Vision features for every sequence without a cached prefix: given, cached under its key, shared
    with an earlier one of the same key here, or from one ViT call for the rest. Returns the failures."""
    run, shared, owners = [], [], {}
    for seq in seqs:
        if seq.entry is not None or seq.vision is not None:
            continue
        key = seq.request.cache_key
        cached = scheduler.visions.get(key) if key is not None and scheduler.visions.capacity else None
        if cached is not None and vision_matches(cached, seq.request.prepared):
            seq.vision, seq.vision_reused = cached, True
        elif key is not None and key in owners:
            shared.append((seq, owners[key]))
        else:
            run.append(seq)
            if key is not None:
                owners[key] = seq
    failures = encode_batch(engine, run)
    for seq in run:
        if seq.vision is not None and seq.request.cache_key is not None and scheduler.visions.capacity:
            scheduler.visions.put(seq.request.cache_key, seq.vision)
    alone = []
    for seq, owner in shared:
        if owner.vision is not None and vision_matches(owner.vision, seq.request.prepared):
            seq.vision, seq.vision_reused = owner.vision, True
        else:  # the owner failed, or (a caller's bug) one key named two images
            alone.append(seq)
    return failures + encode_batch(engine, alone)


def encode_batch(engine, seqs: list[Sequence]) -> list[tuple[Sequence, BaseException]]:
    """One ViT call for all; if it raises, one call each so that only the failing ones fail."""
    if not seqs:
        return []
    prepared = [s.request.prepared for s in seqs]
    try:
        features, seconds = engine.encode_many(prepared)
    except Exception as exc:  # noqa: BLE001 - retried one by one
        if len(seqs) == 1:
            return [(seqs[0], exc)]
        return [f for seq in seqs for f in encode_batch(engine, [seq])]
    for seq, vision in zip(seqs, features):
        seq.vision, seq.vit_s = vision, seconds
    return []
