"""The grounding engine the service calls: one method per stage, values in, values out.

    engine = GroundingEngine.load(ModelSpec(model="Qwen/Qwen3-VL-2B-Instruct"))
    prepared = engine.prepare(screenshot_uint8, PruneSettings())   # resize, select, patchify
    output = engine.ground(prepared, "the Save button")              # ViT, prefill, decode, parse

`ground` returns the model's raw answer, the click point in pixels of the ORIGINAL
screenshot, token counts, the prompt's KV-cache bytes and the time of every stage. It
runs one request through the engine's batch (`pixelprune.model.batching`); a model
worker serving many callers drives the batch itself with `admit`, `step` and `cancel`.
Requests that carry a `cache_key` reuse the vision features and the prompt prefix's
keys/values of an earlier request on the same frame. Nothing here records metrics or
logs requests: the service does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable

import numpy as np
import torch
from transformers import AutoModelForImageTextToText

from pixelprune.model.adapter import MODEL_TYPES, PrunedQwen3VL, VisionFeatures
from pixelprune.model.batching import BatchScheduler, StepReport
from pixelprune.model.pipeline import PreparedImage, chat_token_ids, prepare_image, user_message, vision_spec
from pixelprune.model.processor import load_processor
from pixelprune.model.request import BatchSettings, GroundingOutput, GroundRequest
from pixelprune.model.sequence import Sequence
from pixelprune.profiles import AUTO, QWEN3_VL, ModelProfile, checkpoint_hints, resolve_profile
from pixelprune.selectors import select_blocks
from pixelprune.settings import METHODS, METRICS, PruneSettings

__all__ = ["BatchSettings", "GroundingEngine", "GroundingOutput", "GroundRequest", "ModelSpec", "PreparedImage",
           "PruneSettings", "VisionFeatures"]

RANDOM_WEIGHTS_MARKER = "RANDOM WEIGHTS"  # README.md heading written by `pixelprune tiny-checkpoint`
PROMPT_CACHE_SIZE = 256  # prompt texts whose chat token ids the engine keeps (a few KB each)
TEXT_ATTENTION = ("sdpa", "eager")  # the text model's attention must take our 4-D masks
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    model: str = "Qwen/Qwen3-VL-2B-Instruct"  # hub id or local checkpoint directory
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16"
    attn_implementation: str | None = None  # None: flash_attention_2 on CUDA when installed, else sdpa
    max_new_tokens: int = 24  # generation budget per answer (greedy)
    profile: str = AUTO  # model profile (pixelprune.profiles) name, or "auto": from the checkpoint's name and card


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else must name an available device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use auto, cpu or cuda[:N]")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU; else one of float32, bfloat16, float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_attn_implementation(requested: str | None, device: torch.device) -> str:
    """None -> flash_attention_2 on CUDA when flash_attn is importable, else sdpa. (The vision
    encoder's; the text model takes sdpa unless eager is asked for, see `attention_config`.)"""
    if requested is not None:
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def checkpoint_has_random_weights(model_id: str, config) -> bool:
    """True for checkpoints written by `pixelprune tiny-checkpoint`: a local directory whose
    README.md carries the RANDOM WEIGHTS heading, or a config flag `pixelprune_random_weights`."""
    if bool(getattr(config, "pixelprune_random_weights", False)):
        return True
    readme = Path(model_id) / "README.md"
    return readme.is_file() and RANDOM_WEIGHTS_MARKER in readme.read_text(errors="replace")


def attention_config(vision_attn: str) -> str | dict:
    """`attn_implementation` for from_pretrained: one name when text and vision agree, else per sub-config
    (the batched text model needs TEXT_ATTENTION: it is given 4-D masks)."""
    text_attn = vision_attn if vision_attn in TEXT_ATTENTION else "sdpa"
    return vision_attn if text_attn == vision_attn else {"text_config": text_attn, "vision_config": vision_attn}


class GroundingEngine:
    """A loaded Qwen3-VL (through PrunedQwen3VL), its processor and its batch; see the module docstring."""

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
        self._prompt_cache: dict[str, np.ndarray] = {}  # prompt text -> chat token ids, LRU order
        self._prompt_lock = threading.Lock()  # RPC threads size requests while the worker admits them
        self.batch_settings = batch
        self.scheduler = BatchScheduler(self, batch)

    @classmethod
    def load(cls, spec: ModelSpec, batch: BatchSettings = BatchSettings()) -> "GroundingEngine":
        """Load model and processor with from_pretrained (hub id or local directory)."""
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, image, settings: PruneSettings) -> PreparedImage:
        """Resize, select and patchify one screenshot (uint8 (H, W, 3) array or PIL image)."""
        return prepare_image(image, settings, self.spec_vision, device=self.device, dtype=self.dtype)

    def encode_many(self, prepared: list[PreparedImage]) -> tuple[list[VisionFeatures], float]:
        """(vision features per image, ViT seconds): one ViT call on the kept patches of all images,
        each attending within itself, with full-grid positions."""
        grids = torch.tensor([p.image_grid_thw for p in prepared], dtype=torch.int64, device=self.device)
        rows = torch.cat([p.pixel_values for p in prepared]) if len(prepared) > 1 else prepared[0].pixel_values
        self.sync()
        start = time.perf_counter()
        with torch.inference_mode():
            joint = self.adapter.encode_images(rows, grids, [p.keep for p in prepared])
        self.sync()
        seconds = time.perf_counter() - start
        return [VisionFeatures(embeds=(joint.embeds[i],), deepstack=tuple((level[i],) for level in joint.deepstack),
                               kept_blocks=(joint.kept_blocks[i],), keep=(joint.keep[i],),
                               image_grid_thw=(joint.image_grid_thw[i],)) for i in range(len(prepared))], seconds

    def encode_timed(self, prepared: PreparedImage) -> tuple[VisionFeatures, float]:
        """(vision features of the kept blocks, ViT seconds)."""
        features, seconds = self.encode_many([prepared])
        return features[0], seconds

    def encode(self, prepared: PreparedImage) -> VisionFeatures:
        """Run the ViT on the kept patches only, with full-grid positions (time: `encode_timed`)."""
        return self.encode_timed(prepared)[0]

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

    def check(self, request: GroundRequest) -> None:
        """ValueError for a request that could never run: bad prompt or budget, or more KV-cache
        positions than the batch limit allows. Cheap (no model); callers run it before queueing."""
        budget = self.max_new_tokens if request.max_new_tokens is None else int(request.max_new_tokens)
        if budget < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {budget}")
        ids = self.prompt_ids(self.profile.prompt(request.instruction, request.prompt))
        self.scheduler.check_size(len(ids) - 1 + request.prepared.kept_blocks + budget)

    # ------------------------------------------------------------------ the batch
    def admit(self, requests: list[GroundRequest]) -> list[Sequence]:
        """Prefill as many of `requests` (in order) as fit into the batch; see BatchScheduler.admit."""
        return self.scheduler.admit(requests)

    def step(self) -> StepReport:
        """One decode step of the batch; reports the sequences that ended."""
        return self.scheduler.step()

    def cancel(self, seq: Sequence) -> None:
        self.scheduler.cancel(seq)

    @property
    def idle(self) -> bool:
        """Nothing running or waiting to be reported."""
        return self.scheduler.idle

    @property
    def prefix_cache_bytes(self) -> int:
        """Device bytes the prefix cache holds now."""
        return self.scheduler.prefixes.used

    def ground(self, prepared: PreparedImage, instruction: str, vision: VisionFeatures | None = None,
               prompt: str | None = None, max_new_tokens: int | None = None,
               cache_key: Hashable | None = None) -> GroundingOutput:
        """Answer one instruction on a prepared screenshot (greedy decoding), alone in the batch.

        `prompt` overrides the profile's user template and must contain `{instruction}`. `vision`
        must come from this engine for the same pixels and keep mask (e.g. a previous output's
        `.vision`). `cache_key` names the frame for prefix and vision reuse. TTFT counts resize +
        select + patchify + ViT + tokenize + LLM prefill."""
        if not self.idle:
            raise RuntimeError("ground() needs an idle batch; a model worker is driving this engine")
        request = GroundRequest(prepared=prepared, instruction=instruction, prompt=prompt,
                                max_new_tokens=max_new_tokens, cache_key=cache_key, vision=vision)
        (seq,) = self.admit([request])
        while seq not in self.step().finished:
            pass
        if seq.error is not None:
            raise seq.error
        return seq.output

    def warmup(self) -> GroundingOutput:
        """One tiny request (a 256x250 gradient, resized to 256x256, 2 new tokens) so the first
        real one is not slow; it also compiles the one-axis resize and, on a small grid, every
        near-exact selector kernel (numba compiles on first use: seconds), and on CUDA captures
        the decode step's graphs."""
        ramp = np.linspace(0, 255, 256, dtype=np.float64).astype(np.uint8)
        image = np.stack([np.tile(ramp, (250, 1)), np.tile(ramp[:250, None], (1, 256)),
                          np.full((250, 256), 128, np.uint8)], axis=-1)
        for method in METHODS:
            for metric in METRICS:
                select_blocks(np.ascontiguousarray(image[:64, :64]), method=method, metric=metric, tau=0.02)
        output = self.ground(self.prepare(image, PruneSettings()), "the centre of the image", max_new_tokens=2)
        self.scheduler.capture_graphs()
        return output
