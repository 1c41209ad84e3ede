"""From screenshots (PIL images or uint8 arrays) straight to pruned Qwen3-VL inputs.

This replaces the processor's full-image path (`processor(images=..., text=...)`),
which normalises and patchifies every pixel, with one that prunes first:

    smart_resize -> resize_to (uint8) -> select_blocks on the uint8 pixels ->
    kept_pixel_values (only kept blocks are normalised and patchified) ->
    image_grid_thw of the FULL resized grid

and builds the text side with the processor's own tokenizer and chat template:
each image's `<|image_pad|>` is expanded to t*h*w/4 tokens of the full grid, because
the adapter (`PrunedQwen3VL`) needs the full sequence to compute MRoPE positions.
With nothing pruned, the result equals the processor's output exactly (tested).
On CUDA, resize, selection and patchify run on the device (`device_prep`), same bits.

Resize limits, patch size, mean and std are read from the processor's image
processor config, never guessed; a model profile (`pixelprune.profiles`) may set the
family's own resize limits, system turn, image/text order and chat-template variables.
One prompt (batch 1), any number of images.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch
from PIL import Image
from transformers.utils.chat_template_utils import mark_control_tokens

from pixelprune.geometry import (
    BLOCK_SIZE, MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE, image_grid_thw,
    kept_pixel_values, resize_to, smart_resize, to_rgb_array,
)
from pixelprune.model.device_prep import prepare_on_device
from pixelprune.profiles import QWEN3_VL, ModelProfile, UserTurn
from pixelprune.selectors import select_blocks
from pixelprune.settings import PruneSettings
from pixelprune.timings import Timings

_TOKENIZER_LOCK = threading.Lock()  # chat_token_ids: the tokenizer's split-special-tokens switch is shared state


@dataclass(frozen=True)
class VisionSpec:
    min_pixels: int  # smart_resize lower bound on resized pixels (config size["shortest_edge"])
    max_pixels: int  # smart_resize upper bound on resized pixels (config size["longest_edge"])
    image_mean: tuple[float, float, float]  # per-channel mean after rescaling to 0..1
    image_std: tuple[float, float, float]  # per-channel std after rescaling to 0..1


def vision_spec(processor, profile: ModelProfile | None = None) -> VisionSpec:
    """Read Qwen3-VL's image settings from a processor (or its image processor) and check that
    they are the geometry this pipeline implements (16 px patches, 2x2 merge, 1/255 rescale).
    The profile's resize limits, where it has them, replace the processor's."""
    ip = getattr(processor, "image_processor", processor)
    expected = {"patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    for name, want in expected.items():
        if getattr(ip, name, None) != want:
            raise ValueError(f"image processor {name}={getattr(ip, name, None)!r}; this pipeline needs {want}")
    if not (ip.do_resize and ip.do_rescale and ip.do_normalize) or not math.isclose(ip.rescale_factor, 1 / 255):
        raise ValueError("image processor must resize, rescale by 1/255 and normalise (Qwen3-VL's settings)")
    mean, std = tuple(float(v) for v in ip.image_mean), tuple(float(v) for v in ip.image_std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image_mean/image_std must have 3 values, got {mean} / {std}")
    low, high = int(ip.size["shortest_edge"]), int(ip.size["longest_edge"])
    if profile is not None:
        low = low if profile.min_pixels is None else profile.min_pixels
        high = high if profile.max_pixels is None else profile.max_pixels
    if not 0 < low <= high:
        raise ValueError(f"resize limits must satisfy 0 < min_pixels <= max_pixels, got {low} and {high}")
    return VisionSpec(min_pixels=low, max_pixels=high, image_mean=mean, image_std=std)


@dataclass(frozen=True)
class PreparedImage:
    original_size: tuple[int, int]  # (W, H) of the screenshot as given
    resized_size: tuple[int, int]  # (w, h) after smart_resize; multiples of 32
    resized: np.ndarray | torch.Tensor  # uint8 (h, w, 3) the selector saw: numpy, or a tensor on the
    #                                     device (device path, tau = 0 or no pruning); numpy via .pixels
    keep: np.ndarray  # bool (h/32, w/32): True = block kept (one visual token)
    kept_blocks: int  # number of True in keep
    total_blocks: int  # (h/32) * (w/32)
    staged_rows: torch.Tensor | None  # pixel_values built already (device path); None: built on first use
    rows_spec: tuple  # (mean, std, device, dtype) of the rows `pixel_values` builds on first use
    image_grid_thw: tuple[int, int, int]  # (1, h/16, w/16): the FULL patch grid
    timings: Timings  # seconds of resize, select, patchify (0 until the rows are built); device path: + upload
    prepare_s: float  # seconds spent by prepare_image itself (the caller's thread), before any lazy step

    @property
    def retain_ratio(self) -> float:
        """Kept fraction of the visual tokens."""
        return self.kept_blocks / self.total_blocks

    @cached_property
    def pixel_values(self) -> torch.Tensor:
        """(4*kept_blocks, 1536) processor rows of the kept blocks only, on the model's device.

        On the CPU path they are built here, on first use, not in prepare_image: the image stays
        uint8 (a quarter of the float32 rows' size) until the model worker needs it, and a
        request whose vision features are cached never builds them. The time goes to
        timings.patchify."""
        if self.staged_rows is not None:
            return self.staged_rows
        start = time.perf_counter()
        mean, std, device, dtype = self.rows_spec
        rows = kept_pixel_values(self.pixels, None if self.kept_blocks == self.total_blocks else self.keep,
                                 mean=mean, std=std)
        tensor = torch.from_numpy(rows).to(device=device, dtype=dtype)
        self.timings.patchify = time.perf_counter() - start
        return tensor

    @cached_property
    def pixels(self) -> np.ndarray:
        """uint8 (h, w, 3) numpy: the resized image. Free on the CPU path; on the device path
        (tau = 0 or no pruning) downloaded on first access (h*w*3 bytes: 25 MB at 4K)."""
        if isinstance(self.resized, torch.Tensor):
            return self.resized.cpu().numpy()
        return self.resized


def _rgb_pixels(image) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image (converted like the processor: alpha on white) or array."""
    if isinstance(image, (Image.Image, np.ndarray)):
        return to_rgb_array(image)
    raise ValueError(f"expected a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}")


def prepare_image(image, settings: PruneSettings, spec: VisionSpec, device="cpu",
                  dtype: torch.dtype = torch.float32, on_device: bool | None = None) -> PreparedImage:
    """Resize, select and patchify one image; only kept blocks are normalised.

    `on_device`: None (default) runs resize, exact selection and patchify on `device` when it
    is CUDA (`device_prep.prepare_on_device`: the screenshot is uploaded once) and on the CPU
    with numpy/numba otherwise; True forces the device path on any device, False the CPU
    path. Both give the same keep masks and pixel_values, bit for bit."""
    t0 = time.perf_counter()
    original = _rgb_pixels(image)
    height, width = original.shape[:2]
    new_h, new_w = smart_resize(height, width, factor=BLOCK_SIZE,
                                min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    device = torch.device(device)
    if on_device is None:
        on_device = device.type == "cuda"
    if on_device:
        converted = time.perf_counter() - t0  # RGB conversion + smart_resize: counted as "upload"
        staged = prepare_on_device(original, (new_h, new_w), settings, mean=spec.image_mean,
                                   std=spec.image_std, device=device, dtype=dtype)
        timings = dataclasses.replace(staged.timings, upload=staged.timings.upload + converted)
        return _prepared(original, staged.resized, staged.keep, staged.pixel_values, None, timings)
    pixels = resize_to(original, new_h, new_w)
    t1 = time.perf_counter()
    grid = (new_h // BLOCK_SIZE, new_w // BLOCK_SIZE)
    if settings.enabled:
        keep = select_blocks(pixels, method=settings.method, metric=settings.metric, tau=settings.tau)
    else:
        keep = np.ones(grid, dtype=bool)
    t2 = time.perf_counter()
    return _prepared(original, pixels, keep, None, (spec.image_mean, spec.image_std, device, dtype),
                     Timings(resize=t1 - t0, select=t2 - t1))


def _prepared(original: np.ndarray, resized, keep: np.ndarray, staged_rows: torch.Tensor | None,
              rows_spec: tuple | None, timings: Timings) -> PreparedImage:
    new_h, new_w = resized.shape[:2]
    return PreparedImage(
        original_size=(original.shape[1], original.shape[0]), resized_size=(new_w, new_h), resized=resized,
        keep=keep, kept_blocks=int(np.count_nonzero(keep)), total_blocks=int(keep.size),
        staged_rows=staged_rows, rows_spec=rows_spec, image_grid_thw=image_grid_thw(new_h, new_w),
        timings=timings, prepare_s=timings.prepare)


def image_token_id(processor) -> int:
    """The id of `<|image_pad|>` in this processor's tokenizer."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
    return int(token_id)


def chat_token_ids(processor, messages: list[dict], profile: ModelProfile | None = None) -> np.ndarray:
    """Token ids (int64, read-only) of a chat through the processor's template, one
    `<|image_pad|>` per image item, before expansion. Depends only on the text, so callers
    may cache it per prompt. `profile`: its chat-template variables (e.g. Holo2's
    thinking=False) go to the template.

    The user turns' text is text: a control token written in it (`<|image_pad|>`, `<|im_end|>`,
    `<|im_start|>`, `<tool_call>`, any added token) is encoded as the plain characters it
    consists of, never as the token, so a caller can neither add image placeholders nor close
    its turn and open another (transformers' `sanitize_control_tokens` markers, put on the
    user turns only). A system turn is the model profile's own text and is tokenized as the
    family's code does: GUI-Owl's tool prompt names `<tool_call>`, which the model reads as
    its token."""
    tokenizer = processor.tokenizer
    pattern = _added_tokens_pattern(tuple(tokenizer.added_tokens_encoder))
    marked = [m if m.get("role") == "system" else mark_control_tokens(m, pattern) for m in messages]
    kwargs = profile.chat_template_kwargs if profile else {}
    with _TOKENIZER_LOCK:  # sanitising switches the tokenizer between modes: one chat at a time
        text = tokenizer.apply_chat_template(marked, chat_template=processor.chat_template, tokenize=False,
                                             add_generation_prompt=True, **kwargs)
        ids = tokenizer(text, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    ids.flags.writeable = False
    return ids


@lru_cache(maxsize=8)
def _added_tokens_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """Any of the tokenizer's added tokens, longest first (as transformers' sanitizer matches them)."""
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


def tokenize(processor, messages: list[dict], grids, device="cpu", ids: np.ndarray | None = None
             ) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, mm_token_type_ids (1, L) for a chat with one image item per grid.

    The chat template gives one `<|image_pad|>` per image; each is expanded in token space to
    t*h*w/4 pad tokens of that image's full grid (special tokens are atomic, so this equals the
    processor's string expansion followed by tokenisation). `ids` = `chat_token_ids(processor,
    messages)` computed earlier, to skip the template and the tokenizer."""
    ids = chat_token_ids(processor, messages) if ids is None else ids
    pad = image_token_id(processor)
    at_pad = ids == pad
    if int(at_pad.sum()) != len(grids):
        raise ValueError(f"the chat has {int(at_pad.sum())} image placeholders but {len(grids)} images were given")
    counts = np.ones(ids.shape, dtype=np.int64)
    counts[at_pad] = [t * h * w // (MERGE_SIZE * MERGE_SIZE) for t, h, w in grids]
    full = np.repeat(ids, counts)
    type_ids = np.zeros_like(full)
    type_ids[full == pad] = 1
    video = getattr(processor, "video_token_id", None)
    if video is not None:
        type_ids[full == int(video)] = 2
    rows = {"input_ids": full, "attention_mask": np.ones_like(full), "mm_token_type_ids": type_ids}
    return {name: torch.from_numpy(row).unsqueeze(0).to(device) for name, row in rows.items()}


def user_message(text: str | UserTurn, num_images: int = 1, profile: ModelProfile | None = None) -> list[dict]:
    """The chat of one request: the profile's system turn (if any), then the user turn with
    `num_images` image items. `text`: a string (text after the images, Qwen3-VL's grounding
    layout) or a profile's (before, after) pair (`ModelProfile.prompt`)."""
    return (QWEN3_VL if profile is None else profile).messages(text, num_images)


@dataclass(frozen=True)
class ImageReport:
    original_size: tuple[int, int]  # (W, H) as given
    resized_size: tuple[int, int]  # (w, h) after smart_resize
    kept: int  # kept blocks = visual tokens the model sees
    total: int  # blocks of the full resized grid


@dataclass(frozen=True)
class ModelInputs:
    inputs: dict  # str -> torch.Tensor: input_ids, attention_mask, mm_token_type_ids (FULL sequence),
    #               pixel_values (kept rows only), image_grid_thw (full grids); for PrunedQwen3VL
    keep: tuple  # one bool (h/32, w/32) keep mask per image, to pass as keep=list(keep)
    images: tuple  # one ImageReport per image
    timings: Timings  # seconds summed over images: upload, resize, select, patchify; and tokenize


def build_inputs(processor, images, messages: list[dict], settings: PruneSettings | None = None,
                 device="cpu", dtype: torch.dtype = torch.float32, profile: ModelProfile | None = None) -> ModelInputs:
    """Model inputs for one chat whose image items are `images` (in order), pruned per `settings`
    (None = PruneSettings() defaults). pixel_values go to `dtype`, everything to `device`.
    `profile`: its resize limits and chat-template variables (the messages come from the caller)."""
    settings = PruneSettings() if settings is None else settings
    images = list(images)
    if not images:
        raise ValueError("build_inputs needs at least one image")
    spec = vision_spec(processor, profile)
    prepared = [prepare_image(image, settings, spec, device=device, dtype=dtype) for image in images]
    t0 = time.perf_counter()
    ids = chat_token_ids(processor, messages, profile)
    text_inputs = tokenize(processor, messages, [p.image_grid_thw for p in prepared], device=device, ids=ids)
    tokenize_seconds = time.perf_counter() - t0
    inputs = dict(text_inputs)
    inputs["pixel_values"] = torch.cat([p.pixel_values for p in prepared])
    inputs["image_grid_thw"] = torch.tensor([p.image_grid_thw for p in prepared], dtype=torch.int64, device=device)
    timings = Timings(**{stage: sum(getattr(p.timings, stage) for p in prepared)
                         for stage in ("upload", "resize", "select", "patchify")}, tokenize=tokenize_seconds)
    reports = tuple(ImageReport(p.original_size, p.resized_size, p.kept_blocks, p.total_blocks) for p in prepared)
    return ModelInputs(inputs=inputs, keep=tuple(p.keep for p in prepared), images=reports, timings=timings)
