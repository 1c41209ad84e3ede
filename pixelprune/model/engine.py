"""The grounding engine the service calls: one method per stage, values in, values out.

    engine = GroundingEngine.load(ModelSpec(model="Qwen/Qwen3-VL-2B-Instruct"))
    prepared = engine.prepare(screenshot_uint8, PruneSettings())   # resize, select, patchify
    output = engine.ground(prepared, "the Save button")              # ViT, prefill, decode, parse

`ground` returns the model's raw answer, the click point in pixels of the ORIGINAL
screenshot, token counts, the KV-cache size read from the cache object and the time
of every stage. The vision features it used come back too, so a caller that sees the
same screen again (same pixels, same pruning settings) can pass them as `vision=`
and skip the ViT. Nothing here records metrics or logs requests: the service does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText
from transformers.generation.streamers import BaseStreamer

from pixelprune.model.pipeline import (PreparedImage, chat_token_ids, prepare_image, tokenize, user_message,
                                 vision_spec)
from pixelprune.points import grounding_prompt, normalize_point, parse_point, point_to_pixels
from pixelprune.model.adapter import PrunedQwen3VL, VisionFeatures
from pixelprune.model.processor import load_processor
from pixelprune.selectors import select_blocks
from pixelprune.settings import METHODS, METRICS, PruneSettings

__all__ = ["GroundingEngine", "GroundingOutput", "ModelSpec", "PreparedImage", "PruneSettings", "VisionFeatures"]

RANDOM_WEIGHTS_MARKER = "RANDOM WEIGHTS"  # README.md heading written by `pixelprune tiny-checkpoint`
PROMPT_CACHE_SIZE = 256  # prompt texts whose chat token ids the engine keeps (a few KB each)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    model: str = "Qwen/Qwen3-VL-2B-Instruct"  # hub id or local checkpoint directory
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16"
    attn_implementation: str | None = None  # None: flash_attention_2 on CUDA when installed, else sdpa
    max_new_tokens: int = 24  # generation budget per answer (greedy)


@dataclass(frozen=True)
class GroundingOutput:
    raw_text: str  # the model's answer, special tokens removed
    point: tuple[float, float] | None  # click point in pixels of the ORIGINAL screenshot, or None
    point_normalized: tuple[float, float] | None  # the same point in 0..1 of width/height, or None
    kept_blocks: int  # visual tokens the model saw
    total_blocks: int  # visual tokens of the full resized image
    retain_ratio: float  # kept_blocks / total_blocks
    kv_cache_bytes: int  # key+value bytes of the prompt's KV cache (after prefill)
    vision: VisionFeatures  # the vision features used; pass back as vision= to skip the ViT
    timings: dict  # seconds: resize, select, patchify, vit, prefill, decode_tokens, ttft
    vision_reused: bool  # True when vision= was given and the ViT did not run
    generated_tokens: int  # tokens generated, including the first


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
    """None -> flash_attention_2 on CUDA when flash_attn is importable, else sdpa."""
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


class FirstTokenClock(BaseStreamer):
    """Records when generate hands over the first new token (generate's first `put` is the
    prompt; the second is token 1, already on the host, so the device has finished)."""

    def __init__(self):
        self.puts = 0
        self.first_token_at: float | None = None
        self.tokens: list[int] = []

    def put(self, value):
        self.puts += 1
        if self.puts == 1:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.extend(int(v) for v in value.reshape(-1).tolist())

    def end(self):
        pass


def kv_cache_bytes(cache) -> tuple[int, int]:
    """(bytes, tokens) of all key and value tensors held by a transformers Cache."""
    total, length = 0, 0
    for layer in getattr(cache, "layers", ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.numel() == 0:
            continue
        total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        length = max(length, keys.shape[-2])
    return total, length


class GroundingEngine:
    """A loaded Qwen3-VL (through PrunedQwen3VL) plus its processor; see the module docstring."""

    def __init__(self, model, processor, max_new_tokens: int = 24, is_random_weights: bool = False):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.processor = processor
        self.adapter = PrunedQwen3VL(model)
        self.spec_vision = vision_spec(processor)
        self.max_new_tokens = int(max_new_tokens)
        self.is_random_weights = bool(is_random_weights)  # outputs shown to anyone must say so
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._prompt_cache: dict[str, np.ndarray] = {}  # prompt text -> chat token ids, LRU order

    @classmethod
    def load(cls, spec: ModelSpec) -> "GroundingEngine":
        """Load model and processor with from_pretrained (hub id or local directory)."""
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        attn = resolve_attn_implementation(spec.attn_implementation, device)
        model = AutoModelForImageTextToText.from_pretrained(spec.model, dtype=dtype, attn_implementation=attn)
        if getattr(model.config, "model_type", None) != "qwen3_vl":
            raise ValueError(f"{spec.model!r} is a {model.config.model_type!r} checkpoint, not Qwen3-VL")
        model = model.to(device).eval()
        processor = load_processor(spec.model)
        return cls(model, processor, max_new_tokens=spec.max_new_tokens,
                   is_random_weights=checkpoint_has_random_weights(spec.model, model.config))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, image, settings: PruneSettings) -> PreparedImage:
        """Resize, select and patchify one screenshot (uint8 (H, W, 3) array or PIL image)."""
        return prepare_image(image, settings, self.spec_vision, device=self.device, dtype=self.dtype)

    def encode_timed(self, prepared: PreparedImage) -> tuple[VisionFeatures, float]:
        """(vision features of the kept blocks, ViT seconds)."""
        grid = torch.tensor([prepared.image_grid_thw], dtype=torch.int64, device=self.device)
        self._sync()
        start = time.perf_counter()
        with torch.inference_mode():
            features = self.adapter.encode_images(prepared.pixel_values, grid, [prepared.keep])
        self._sync()
        return features, time.perf_counter() - start

    def encode(self, prepared: PreparedImage) -> VisionFeatures:
        """Run the ViT on the kept patches only, with full-grid positions (time: `encode_timed`)."""
        return self.encode_timed(prepared)[0]

    def ground(self, prepared: PreparedImage, instruction: str, vision: VisionFeatures | None = None,
               prompt: str | None = None, max_new_tokens: int | None = None) -> GroundingOutput:
        """Answer one instruction on a prepared screenshot (greedy decoding).

        `prompt` overrides DEFAULT_GROUNDING_PROMPT and must contain `{instruction}`. `vision`
        must come from this engine for the same pixels and keep mask (e.g. a previous output's
        `.vision`). TTFT counts resize + select + patchify + ViT + tokenize + LLM prefill."""
        text = grounding_prompt(instruction, prompt)
        budget = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if budget < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {budget}")
        reused = vision is not None
        vit_seconds = 0.0
        if vision is None:
            vision, vit_seconds = self.encode_timed(prepared)
        start = time.perf_counter()
        inputs = tokenize(self.processor, user_message(text), [prepared.image_grid_thw], device=self.device,
                          ids=self._prompt_ids(text))
        inputs["pixel_values"] = prepared.pixel_values
        inputs["image_grid_thw"] = torch.tensor([prepared.image_grid_thw], dtype=torch.int64, device=self.device)
        clock = FirstTokenClock()
        self._sync()
        generate_start = time.perf_counter()
        with torch.inference_mode():
            out = self.adapter.generate(
                **inputs, keep=[prepared.keep], vision=vision, max_new_tokens=budget, do_sample=False,
                streamer=clock, return_dict_in_generate=True, pad_token_id=self._pad_token_id())
        self._sync()
        end = time.perf_counter()
        first = clock.first_token_at if clock.first_token_at is not None else end
        prompt_tokens = int(inputs["input_ids"].shape[1]) - (prepared.total_blocks - prepared.kept_blocks)
        return self._output(prepared, out, clock.tokens, vision, reused, prompt_tokens, timings={
            **prepared.timings, "vit": vit_seconds, "prefill": first - generate_start,
            "decode_tokens": end - first,
            "ttft": sum(prepared.timings.values()) + vit_seconds + (first - start)})

    def _prompt_ids(self, text: str) -> np.ndarray:
        """The chat's token ids for one prompt text, from a small LRU: agents repeat instructions."""
        ids = self._prompt_cache.pop(text, None)
        if ids is None:
            ids = chat_token_ids(self.processor, user_message(text))
        self._prompt_cache[text] = ids  # most recent last
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        return ids

    def _pad_token_id(self) -> int | None:
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        return pad if pad is not None else self.processor.tokenizer.pad_token_id

    def _output(self, prepared, out, tokens, vision, reused, prompt_tokens, timings) -> GroundingOutput:
        raw_text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        cache_bytes, cache_tokens = kv_cache_bytes(getattr(out, "past_key_values", None))
        # The cache returned holds the prompt plus every generated token but the last;
        # scale to the prompt (what prefill wrote).
        kv_bytes = cache_bytes // cache_tokens * prompt_tokens if cache_tokens else 0
        found = parse_point(raw_text)
        point = None if found is None else point_to_pixels((found.x, found.y), prepared.original_size)
        normalized = None if found is None else normalize_point((found.x, found.y))
        return GroundingOutput(
            raw_text=raw_text, point=point, point_normalized=normalized, kept_blocks=prepared.kept_blocks,
            total_blocks=prepared.total_blocks, retain_ratio=prepared.kept_blocks / prepared.total_blocks,
            kv_cache_bytes=kv_bytes, vision=vision, timings=timings, vision_reused=reused,
            generated_tokens=len(tokens))

    def warmup(self) -> GroundingOutput:
        """One tiny request (a 256x250 gradient, resized to 256x256, 2 new tokens) so the first
        real one is not slow; it also compiles the one-axis resize and, on a small grid, every
        near-exact selector kernel (numba compiles on first use: seconds)."""
        ramp = np.linspace(0, 255, 256, dtype=np.float64).astype(np.uint8)
        image = np.stack([np.tile(ramp, (250, 1)), np.tile(ramp[:250, None], (1, 256)),
                          np.full((250, 256), 128, np.uint8)], axis=-1)
        for method in METHODS:
            for metric in METRICS:
                select_blocks(np.ascontiguousarray(image[:64, :64]), method=method, metric=metric, tau=0.02)
        return self.ground(self.prepare(image, PruneSettings()), "the centre of the image", max_new_tokens=2)
