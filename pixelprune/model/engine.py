"""The grounding engine: a scheduler that decides, a runner that owns the device, one step at a time.

    engine = GroundingEngine.load(ModelSpec(model="Qwen/Qwen3-VL-2B-Instruct"))
    prepared = engine.prepare(screenshot_uint8, PruneSettings())   # resize, select, patchify
    output = engine.ground(prepared, "the Save button")              # ViT, prefill, decode, parse

Many callers at once go through `pixelprune.model.loop.EngineLoop`, which repeats
`engine.step()`:

    plan, ended = scheduler.schedule(now)    # torch-free: who runs, which rows, what to store
    result = runner.execute(plan)            # the device: moves, layout, ViT, prefill, decode
    ended += scheduler.update(plan, result)  # tokens in, finished sequences out

`engine.sequence(request)` turns a `GroundRequest` into the scheduler's `Sequence`
(tokenised and checked on the caller's thread: ValueError for a request that could
never run); `engine.output(seq)` turns a finished one into a `GroundingOutput`: the
model's raw answer, the click point in pixels of the ORIGINAL screenshot, token counts,
the sum of the answer tokens' log-probabilities, the prompt's KV-cache bytes and the
time of every stage. Requests that carry a `cache_key` reuse the vision features and the
prompt prefix's keys/values of an earlier request on the same frame. Nothing here
records metrics or logs requests: the service does.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np
import torch
from transformers import AutoModelForImageTextToText

from pixelprune.model.adapter import MODEL_TYPES, PrunedQwen3VL, VisionFeatures
from pixelprune.model.attention import SLOT_ATTENTION
from pixelprune.model.checkpoint import check_model
from pixelprune.model.loading import (RANDOM_WEIGHTS_MARKER, TEXT_LOADED, attention_config,
                                      checkpoint_has_random_weights, resolve_attn_implementation, resolve_device,
                                      resolve_dtype)
from pixelprune.model.compiled import compile_feed_forward
from pixelprune.model.pipeline import (PreparedImage, chat_token_ids, image_token_id, prepare_image, user_message,
                                       vision_spec)
from pixelprune.model.positions import same_masks
from pixelprune.model.processor import load_processor
from pixelprune.model.request import CPU_KV_TOKENS, BatchSettings, GroundingOutput, GroundRequest, ModelSpec
from pixelprune.model.runner import ModelRunner, Work
from pixelprune.model.scheduler import LENGTH_BUCKETS, Scheduler, SchedulerLimits
from pixelprune.model.step import Sequence, Status, StepResult
from pixelprune.profiles import AUTO, QWEN3_VL, ModelProfile, checkpoint_hints, resolve_profile
from pixelprune.selectors import select_blocks
from pixelprune.settings import METHODS, METRICS, PruneSettings

__all__ = ["BatchSettings", "GroundingEngine", "GroundingOutput", "GroundRequest", "ModelSpec", "PreparedImage",
           "RANDOM_WEIGHTS_MARKER", "attention_config", "checkpoint_has_random_weights", "resolve_attn_implementation",
           "resolve_device", "resolve_dtype",
           "PruneSettings", "Sequence", "StepStats", "VisionFeatures"]

log = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 256  # prompt texts whose chat token ids the engine keeps (a few KB each)
TEXT_ATTENTION = TEXT_LOADED + (SLOT_ATTENTION,)  # text attentions the engine drives (sdpa becomes SLOT_ATTENTION)
WARMUP_KV_TOKENS = 16384  # KV pool positions while the model warms up on CUDA (then sized from free memory)


def kv_pool_tokens(free_bytes: int, fraction: float, bytes_per_token: int, reserved_bytes: int = 0) -> int:
    """KV-cache positions that `fraction` of the device's free memory holds, after `reserved_bytes` (the
    prefix cache) are set aside; at least one slot of the shortest length."""
    usable = max(0, free_bytes - reserved_bytes) * fraction
    return max(LENGTH_BUCKETS[0], int(usable) // bytes_per_token)


def keep_digest(keep: np.ndarray) -> bytes:
    """Identity of a keep mask (its shape and bits), for the scheduler's signatures."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(keep.shape, dtype=np.int64).tobytes())
    h.update(np.packbits(keep).tobytes())
    return h.digest()


def vision_matches(vision: VisionFeatures, prepared) -> bool:
    """The features are of one image with this grid and keep mask."""
    return (tuple(vision.image_grid_thw) == (tuple(prepared.image_grid_thw),)
            and same_masks(list(vision.keep), [prepared.keep]))


@dataclass(frozen=True)
class StepStats:
    batch_size: int  # sequences decoded in the step (0: none)
    prefilled: int  # sequences prefilled in the step
    seconds: float  # wall time of the step
    kv_bytes: int  # key/value bytes the running sequences hold after the step
    eager_steps: int  # decode steps that ran eagerly although CUDA graphs were on
    graphs: int  # CUDA graphs held


class GroundingEngine:
    """A loaded Qwen3-VL (through PrunedQwen3VL), its processor, a scheduler and a runner; see the module
    docstring. `step` is driven by one thread (an EngineLoop, or `ground` when nothing else drives it)."""

    def __init__(self, model, processor, max_new_tokens: int = 24, is_random_weights: bool = False,
                 batch: BatchSettings = BatchSettings(), profile: ModelProfile = QWEN3_VL, profile_reason: str = ""):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        text = model.config.text_config
        if text._attn_implementation not in TEXT_ATTENTION:
            raise ValueError(f"the text model must use {' or '.join(TEXT_ATTENTION)} attention (it takes 4-D masks), "
                             f"got {text._attn_implementation!r}")
        self.model = model
        self.processor = processor
        self.adapter = PrunedQwen3VL(model)
        self.profile, self.profile_reason = profile, profile_reason  # the family's prompt, resize and answer space
        self.spec_vision = vision_spec(processor, profile)
        self.max_new_tokens = int(max_new_tokens)
        self.is_random_weights = bool(is_random_weights)  # outputs shown to anyone must say so
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # key + value bytes of one token's cache entry over all text layers
        self.kv_bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * self.dtype.itemsize
        eos = model.generation_config.eos_token_id
        eos = processor.tokenizer.eos_token_id if eos is None else eos
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        self.image_token_id = image_token_id(processor)
        self._prompt_cache: dict[str, np.ndarray] = {}  # prompt text -> chat token ids, LRU order
        self._prompt_lock = threading.Lock()  # RPC threads tokenise while the loop runs
        self.batch_settings = batch
        self.pool_sized = batch.max_batch_tokens is not None or self.device.type != "cuda"
        capacity = batch.max_batch_tokens or (WARMUP_KV_TOKENS if self.device.type == "cuda" else CPU_KV_TOKENS)
        if batch.compile:
            compile_feed_forward(model, batch.compile_backend)  # compiled by the warm-up's first call
        self.runner = ModelRunner(model, processor, self.encode_features, capacity, cuda_graphs=batch.cuda_graphs)
        stop = self._holds_point if batch.stop_after_point else None
        self.scheduler = Scheduler(self._limits(capacity), self.eos_token_ids, stop=stop)
        self._driver = None  # the engine loop stepping this engine (one at a time)
        self._driver_lock = threading.Lock()

    def attach(self, driver) -> None:
        """Make `driver` (an engine loop) the one thread that steps this engine; RuntimeError if another
        live loop already does (its futures would never resolve). Engines may share a model instead."""
        with self._driver_lock:
            current = self._driver
            if current is not None and current is not driver and getattr(current, "alive", False):
                raise RuntimeError("this GroundingEngine is already driven by another engine loop; give each server "
                                   "its own engine (engines may share one model: GroundingEngine(model, processor))")
            self._driver = driver

    def detach(self, driver) -> None:
        with self._driver_lock:
            if self._driver is driver:
                self._driver = None

    def _limits(self, capacity_tokens: int) -> SchedulerLimits:
        b = self.batch_settings
        return SchedulerLimits(capacity_tokens=capacity_tokens, max_batch_size=b.max_batch_size,
                               max_prefill_tokens=b.max_prefill_tokens, prefix_cache_bytes=b.prefix_cache_bytes,
                               kv_bytes_per_token=self.kv_bytes_per_token, vision_cache_size=b.vision_cache_size)

    @classmethod
    def load(cls, spec: ModelSpec, batch: BatchSettings = BatchSettings()) -> "GroundingEngine":
        """Load model and processor with from_pretrained (hub id or local directory); a path that is not a
        checkpoint, a hub id that cannot be fetched or an unknown profile is one ValueError/OSError line,
        before any loading."""
        if spec.profile != AUTO:
            resolve_profile(spec.profile, spec.model, ())  # an unknown name first: it needs no checkpoint
        check_model(spec.model)
        profile, reason = resolve_profile(spec.profile, spec.model, checkpoint_hints(spec.model))
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        attn = attention_config(resolve_attn_implementation(spec.attn_implementation, device))
        model = AutoModelForImageTextToText.from_pretrained(spec.model, dtype=dtype, attn_implementation=attn)
        if getattr(model.config, "model_type", None) not in MODEL_TYPES:
            raise ValueError(f"{spec.model!r} is a {model.config.model_type!r} checkpoint, not Qwen3-VL (dense or MoE)")
        model = model.to(device).eval()
        processor = load_processor(spec.model)
        return cls(model, processor, max_new_tokens=spec.max_new_tokens,
                   is_random_weights=checkpoint_has_random_weights(spec.model, model.config), batch=batch,
                   profile=profile, profile_reason=reason)

    def sync(self) -> None:
        """Wait for the device (timings measure finished work)."""
        self.runner.sync()

    # ------------------------------------------------------------------ stages on the caller's thread
    def prepare(self, image, settings: PruneSettings) -> PreparedImage:
        """Resize, select and patchify one screenshot (uint8 (H, W, 3) array or PIL image)."""
        return prepare_image(image, settings, self.spec_vision, device=self.device, dtype=self.dtype)

    def prompt_ids(self, text: str) -> np.ndarray:
        """The chat's token ids for one prompt text, from a small LRU: agents repeat instructions."""
        with self._prompt_lock:
            ids = self._prompt_cache.pop(text, None)
            if ids is None:
                ids = chat_token_ids(self.processor, user_message(text, profile=self.profile), self.profile)
            self._prompt_cache[text] = ids  # most recent last
            while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            return ids

    def sequence(self, request: GroundRequest, deadline: float | None = None,
                 is_active: Callable[[], bool] | None = None) -> Sequence:
        """The scheduler's Sequence for a request; ValueError for one that could never run (bad prompt or
        budget, vision features of other pixels, more KV-cache positions than the pool holds). Cheap: no model."""
        budget = self.max_new_tokens if request.max_new_tokens is None else int(request.max_new_tokens)
        if budget < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {budget}")
        ids = self.prompt_ids(self.profile.prompt(request.instruction, request.prompt))
        pads = np.flatnonzero(ids == self.image_token_id)
        if len(pads) != 1:
            raise ValueError("the prompt must hold exactly one image placeholder")
        prepared, pad = request.prepared, int(pads[0])
        prompt_tokens = len(ids) - 1 + prepared.kept_blocks
        if not self.scheduler.fits_alone(prompt_tokens + budget):
            raise ValueError(f"the prompt and answer need {prompt_tokens + budget} tokens of KV cache, more than this "
                             f"server's pool holds ({self.scheduler.limits.capacity_tokens} positions, "
                             "--max-batch-tokens); send a smaller screenshot or enable pruning")
        if request.vision is not None and not vision_matches(request.vision, prepared):
            raise ValueError("vision features were computed for other pixels or another keep mask")
        grid, digest = tuple(prepared.image_grid_thw), keep_digest(prepared.keep)
        return Sequence(prompt_tokens=prompt_tokens, budget=budget, prefix_len=pad + prepared.kept_blocks,
                        cache_key=request.cache_key, prefix_signature=(tuple(ids[:pad].tolist()), grid, digest),
                        vision_signature=(grid, digest), has_vision=request.vision is not None,
                        deadline=deadline, is_active=is_active,
                        payload=Work(prepared=prepared, ids=ids, pad=pad, vision=request.vision,
                                     instruction=request.instruction))

    def check(self, request: GroundRequest) -> None:
        """ValueError for a request that could never run (see `sequence`)."""
        self.sequence(request)

    # ------------------------------------------------------------------ the loop's verbs
    def add(self, seq: Sequence) -> None:
        """Queue a sequence (the thread that drives `step` only)."""
        self.scheduler.add(seq)

    def cancel(self, seq: Sequence) -> None:
        """End a sequence (the thread that drives `step` only); the next step reports it."""
        self.scheduler.cancel(seq)

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing runs."""
        return self.scheduler.idle

    def abort_all(self, error: BaseException) -> list[Sequence]:
        """After a step failed half-way: fail every waiting and running sequence, forget the stores (the
        scheduler's bookkeeping and the runner's tensors may disagree), start from an empty batch."""
        ended = self.scheduler.cancel_all(error)
        self.scheduler.reset()
        self.runner.prefixes.clear()
        self.runner.visions.clear()
        return ended

    def step(self, on_step: Callable[[StepStats], None] | None = None) -> list[Sequence]:
        """schedule -> execute -> update; the sequences that ended (each exactly once, in any state)."""
        start = time.perf_counter()
        plan, ended = self.scheduler.schedule(time.monotonic())
        if plan.empty:
            return ended
        result: StepResult = self.runner.execute(plan)
        ended += self.scheduler.update(plan, result)
        if on_step is not None:
            held = sum(s.length for s in self.scheduler.running if not s.done) * self.kv_bytes_per_token
            on_step(StepStats(batch_size=len(plan.decodes), prefilled=len(plan.prefills),
                              seconds=time.perf_counter() - start, kv_bytes=held, eager_steps=result.eager_steps,
                              graphs=result.graphs))
        return ended

    @property
    def prefix_cache_bytes(self) -> int:
        """Device bytes the prefix cache holds now."""
        return self.runner.prefix_bytes

    @property
    def kv_capacity_tokens(self) -> int:
        """Positions of the KV pool."""
        return self.runner.capacity_tokens

    # ------------------------------------------------------------------ outputs
    def _holds_point(self, seq: Sequence) -> bool:
        """stop_after_point: the answer so far holds a closed point in the profile's form and space."""
        prepared, text = seq.payload.prepared, self.processor.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        return self.profile.point(text, prepared.resized_size, prepared.original_size, partial=True) is not None

    def output(self, seq: Sequence) -> GroundingOutput:
        """The answer of a FINISHED sequence."""
        if seq.status is not Status.FINISHED:
            raise ValueError(f"sequence {seq.id} has no answer ({seq.status.value})")
        work: Work = seq.payload
        prepared = work.prepared
        raw_text = self.processor.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        found = self.profile.point(raw_text, prepared.resized_size, prepared.original_size)
        now = time.monotonic()
        timings = dataclasses.replace(prepared.timings, vit=seq.vit_s, prefill=seq.prefill_s,
                                      decode_tokens=now - seq.first_token_at)
        timings = timings.with_events(("admitted", seq.admitted_at), ("vit_start", seq.vit_start),
                                      ("vit_end", seq.vit_end), ("prefill_start", seq.prefill_start),
                                      ("first_token", seq.first_token_at))
        return GroundingOutput(
            raw_text=raw_text, point=None if found is None else found.pixels,
            point_normalized=None if found is None else found.normalized,
            kept_blocks=prepared.kept_blocks, total_blocks=prepared.total_blocks,
            retain_ratio=prepared.kept_blocks / prepared.total_blocks,
            kv_cache_bytes=seq.prompt_tokens * self.kv_bytes_per_token, vision=seq.vision,
            timings=dataclasses.replace(timings, ttft=prepared.prepare_s + timings.ttft),  # + the caller's part
            vision_reused=seq.vision_hit, generated_tokens=len(seq.tokens), prefix_reused=seq.prefix_hit,
            answer_logprob=seq.logprob)

    # ------------------------------------------------------------------ one request, inline
    def encode_features(self, prepared: list[PreparedImage]) -> list[VisionFeatures]:
        """Vision features per image from one ViT call on the kept patches of all images, each attending
        within itself, with full-grid positions. Queues the work on the device and returns (no waiting)."""
        grids = torch.tensor([p.image_grid_thw for p in prepared], dtype=torch.int64)
        rows = torch.cat([p.pixel_values for p in prepared]) if len(prepared) > 1 else prepared[0].pixel_values
        with torch.inference_mode():
            joint = self.adapter.encode_images(rows, grids, [p.keep for p in prepared])
        return [VisionFeatures(embeds=(joint.embeds[i],), deepstack=tuple((level[i],) for level in joint.deepstack),
                               kept_blocks=(joint.kept_blocks[i],), keep=(joint.keep[i],),
                               image_grid_thw=(joint.image_grid_thw[i],)) for i in range(len(prepared))]

    def encode_many(self, prepared: list[PreparedImage]) -> tuple[list[VisionFeatures], float]:
        """(vision features per image, ViT seconds, the device waited for): `encode_features`, timed."""
        self.sync()
        start = time.perf_counter()
        features = self.encode_features(prepared)
        self.sync()
        return features, time.perf_counter() - start

    def encode_timed(self, prepared: PreparedImage) -> tuple[VisionFeatures, float]:
        """(vision features of the kept blocks, ViT seconds)."""
        features, seconds = self.encode_many([prepared])
        return features[0], seconds

    def encode(self, prepared: PreparedImage) -> VisionFeatures:
        """Run the ViT on the kept patches only, with full-grid positions (time: `encode_timed`)."""
        return self.encode_timed(prepared)[0]

    def ground(self, prepared: PreparedImage, instruction: str, vision: VisionFeatures | None = None,
               prompt: str | None = None, max_new_tokens: int | None = None,
               cache_key: Hashable | None = None) -> GroundingOutput:
        """Answer one instruction on a prepared screenshot (greedy decoding), stepping the engine on this
        thread; nothing else may be driving it.

        `prompt` overrides the profile's user template and must contain `{instruction}`. `vision`
        must come from this engine for the same pixels and keep mask (e.g. a previous output's
        `.vision`). `cache_key` names the frame for prefix and vision reuse. TTFT counts resize +
        select + patchify + ViT + tokenize + LLM prefill."""
        if not self.idle:
            raise RuntimeError("ground() needs an idle engine; an engine loop is driving it")
        seq = self.sequence(GroundRequest(prepared=prepared, instruction=instruction, prompt=prompt,
                                          max_new_tokens=max_new_tokens, cache_key=cache_key, vision=vision))
        self.add(seq)
        while not seq.done:
            self.step()
        while not self.idle:  # its row leaves the batch
            self.step()
        if seq.status is Status.FAILED:
            raise seq.error
        return self.output(seq)

    # ------------------------------------------------------------------ warm-up and the KV pool
    def size_kv_pool(self, free_bytes: int | None = None) -> int:
        """On CUDA without --max-batch-tokens: size the KV pool from the device's free memory (after the model
        and a warm-up), `kv_cache_memory_fraction` of it, the prefix cache set aside. Needs an idle engine.
        Returns the pool's positions."""
        if self.pool_sized:
            return self.kv_capacity_tokens
        if not self.idle:
            raise RuntimeError("the KV pool is sized with nothing running")
        old = self.runner.pool_bytes
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(self.device)[0] + old
        tokens = kv_pool_tokens(free_bytes, self.batch_settings.kv_cache_memory_fraction, self.kv_bytes_per_token,
                                self.batch_settings.prefix_cache_bytes)
        self.runner = None  # the warm-up pool is freed before the sized one is allocated:
        gc.collect()  # the runner's decode step (and its CUDA graphs) refer back to it, so refcounts alone keep it
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.runner = ModelRunner(self.model, self.processor, self.encode_features, tokens,
                                  cuda_graphs=self.batch_settings.cuda_graphs)
        self.scheduler = Scheduler(self._limits(tokens), self.eos_token_ids, stop=self.scheduler.stop)
        self.pool_sized = True
        log.info("KV pool: %d positions (%.1f GiB, %g of %.1f GiB free)", tokens,
                 tokens * self.kv_bytes_per_token / 2 ** 30, self.batch_settings.kv_cache_memory_fraction,
                 free_bytes / 2 ** 30)
        return tokens

    def warmup(self) -> GroundingOutput:
        """One tiny request (a 256x250 gradient, resized to 256x256, 2 new tokens) so the first
        real one is not slow; it also compiles the one-axis resize and, on a small grid, every
        near-exact selector kernel (numba compiles on first use: seconds); then, on CUDA, sizes the
        KV pool from the free memory and captures the decode step's graphs."""
        ramp = np.linspace(0, 255, 256, dtype=np.float64).astype(np.uint8)
        image = np.stack([np.tile(ramp, (250, 1)), np.tile(ramp[:250, None], (1, 256)),
                          np.full((250, 256), 128, np.uint8)], axis=-1)
        for method in METHODS:
            for metric in METRICS:
                select_blocks(np.ascontiguousarray(image[:64, :64]), method=method, metric=metric, tau=0.02)
        output = self.ground(self.prepare(image, PruneSettings()), "the centre of the image", max_new_tokens=2)
        self.size_kv_pool()
        self.runner.capture_graphs(self.batch_settings.max_batch_size)
        return output
