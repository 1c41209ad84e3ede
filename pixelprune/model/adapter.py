"""Run one loaded Qwen3-VL model on the kept blocks only, with full-image positions.

`PrunedQwen3VL(model)` wraps a `Qwen3VLForConditionalGeneration` (transformers 5.23,
`models/qwen3_vl/modeling_qwen3_vl.py`) or its MoE sibling `Qwen3VLMoeForConditionalGeneration`
(`models/qwen3_vl_moe/modeling_qwen3_vl_moe.py`: the same vision tower, `Qwen3VLModel.forward`
and `get_rope_index`, the same text attention; only the decoder's MLP is a sparse mixture of
experts, which sees the same hidden states) without changing any class: it only uses the
public hooks of that version (QWEN3VL.md section 7):

* the ViT (`Qwen3VLVisionModel.forward`, L665-718) pops precomputed `position_ids`,
  `interp_indices`/`interp_weights`, `cu_seqlens` and `max_seqlen` from its kwargs
  (`transformers/vision_utils.py`); we pass the full grid's rows gathered at the kept
  patches, and one attention segment of kept patches per image;
* `Qwen3VLModel.forward` (L1131-1238) takes `mm_encoder_outputs={"image": ...}` instead of
  pixel values, and skips its own position computation when `position_ids` is given;
* `Qwen3VLTextModel.forward` (L781-791) reads 4-row `position_ids` as [text; t; h; w].
  MRoPE rows come from `get_rope_index` (L913) on the full sequence, kept columns only.

When nothing is pruned the wrapper calls the stock model with the stock inputs, so
its outputs are the unmodified model's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from pixelprune.model.positions import grid_list, kept_patch_rows, prune_token_inputs, same_masks, validate_keep, \
    vision_attention_kwargs
from pixelprune.model.processor import rows_to_uint8_images
from pixelprune.selectors import select_blocks
from pixelprune.settings import PruneSettings

MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")  # config.model_type of the checkpoints this adapter runs (dense, MoE)


@dataclass(frozen=True)
class VisionFeatures:
    """ViT output for the kept blocks of each image; pass it back as `vision=` to skip the ViT."""

    embeds: tuple[torch.Tensor, ...]  # per image: (kept_blocks_i, text hidden) merger output, one row per LLM token
    deepstack: tuple[tuple[torch.Tensor, ...], ...]  # per DeepStack level, per image: (kept_blocks_i, text hidden)
    kept_blocks: tuple[int, ...]  # per image: number of kept 32x32 blocks (= visual tokens)
    keep: tuple[np.ndarray, ...]  # per image: read-only bool (grid_h/2, grid_w/2) keep mask, raster order
    image_grid_thw: tuple[tuple[int, int, int], ...]  # per image: full (t, h, w) patch grid of the resized image

    @property
    def total_blocks(self) -> tuple[int, ...]:
        """Blocks per image before pruning."""
        return tuple(int(k.size) for k in self.keep)

    def encoder_output(self) -> BaseModelOutputWithDeepstackFeatures:
        """The `mm_encoder_outputs["image"]` value `Qwen3VLModel.forward` expects (split per image)."""
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=self.embeds, deepstack_features=[list(level) for level in self.deepstack])


@dataclass(frozen=True)
class PrunedInputs:
    """What `PrunedQwen3VL.prepare` hands to `model(...)` / `model.generate(...)`."""

    model_kwargs: dict  # input_ids, attention_mask, mm_token_type_ids, position_ids, mm_encoder_outputs (or stock inputs)
    vision: VisionFeatures | None  # the ViT features used; None on the stock path
    pruned: bool  # False: model_kwargs are the caller's inputs unchanged (nothing pruned)
    rope_deltas: torch.Tensor | None  # (batch, 1): max MRoPE position + 1 - pruned length, for cached decoding


class PrunedQwen3VL:
    """Pixel-pruned inference for one loaded Qwen3VLForConditionalGeneration (or Qwen3VLMoe...) instance.

    `config` is a `pixelprune.settings.PruneSettings` (enabled, method, metric, tau) used when
    no `keep` masks are given; None means the default settings (lossless pred2d). No class
    is modified: two wrappers with different settings may share a process. The only model
    state written is the instance's own `model.model.rope_deltas`, as the stock forward does.
    """

    def __init__(self, model: Any, config: Any = None):
        if not hasattr(model, "model") or not hasattr(model.model, "visual") or not hasattr(model.model, "get_rope_index"):
            raise ValueError(f"expected a loaded Qwen3VLForConditionalGeneration (or its MoE variant), "
                             f"got {type(model).__name__}")
        if config is None:
            config = PruneSettings()
        if not isinstance(config, PruneSettings):
            raise ValueError(f"config must be a pixelprune.settings.PruneSettings, got {type(config).__name__}")
        self.model = model
        self.config = config

    # ------------------------------------------------------------------ selection
    def select(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[np.ndarray]:
        """Keep masks (grid_h/2, grid_w/2) per image from the configured selector.

        The selector works on exact uint8 pixels: the processor rows (mean = std = 0.5)
        are inverted with round((x*0.5 + 0.5)*255) and rearranged to (H, W, 3).
        Pruning disabled -> all-True masks (the stock path). No counterpart in transformers:
        this is the pixel-level step that runs before the ViT."""
        grids = grid_list(image_grid_thw)
        if not self.config.enabled:
            return [np.ones((h // 2, w // 2), dtype=bool) for _, h, w in grids]
        images = rows_to_uint8_images(pixel_values, grids)
        return [select_blocks(img, method=self.config.method, metric=self.config.metric, tau=self.config.tau)
                for img in images]

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                      keep: list[np.ndarray] | np.ndarray) -> VisionFeatures:
        """Run the ViT on the kept patches only, with the full grid's positions.

        Follows `Qwen3VLModel.get_image_features` (5.23 L1018-1037) with these changes:
        `visual` gets only the kept patch rows; `position_ids` (2D RoPE) and
        `interp_indices`/`interp_weights` (absolute position embedding) are the full
        grid's rows gathered at the kept patches; `cu_seqlens` has one segment of kept
        patches per image (`vision_attention_kwargs`: on the host for sdpa/eager, on the
        device with a host-int `max_seqlen` for flash-attention); the output is split
        by kept blocks, not by `grid.prod()//4`. `pixel_values` may hold all rows of the
        processor output or only the kept blocks' rows (4 per block). Runs under the caller's
        grad mode, like the stock model (wrap in torch.inference_mode() to serve)."""
        grids = grid_list(image_grid_thw)
        masks = validate_keep(keep, grids)
        kept = [int(m.sum()) for m in masks]
        rows = kept_patch_rows(masks, grids)
        n_full, n_kept = sum(t * h * w for t, h, w in grids), 4 * sum(kept)
        if pixel_values.ndim != 2:
            raise ValueError(f"pixel_values must be 2-D (rows, features), got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] == n_full:
            pixel_values = pixel_values[rows.to(pixel_values.device)]
        elif pixel_values.shape[0] != n_kept:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows; expected {n_full} (all patches) "
                             f"or {n_kept} (4 per kept block)")
        visual = self.model.model.visual
        grid_cpu = torch.tensor(grids, dtype=torch.long)
        interp_idx, interp_w = get_vision_interpolation_indices_and_weights(
            grid_cpu, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
        position_ids = get_vision_position_ids(grid_cpu, visual.spatial_merge_size)
        device = visual.device
        out = visual(pixel_values.to(device).type(visual.dtype), grid_thw=grid_cpu.to(device), return_dict=True,
                     position_ids=position_ids[rows].to(device), interp_indices=interp_idx[rows].to(device),
                     interp_weights=interp_w[rows].to(device), **vision_attention_kwargs(kept, visual.config, device))
        return VisionFeatures(
            embeds=tuple(torch.split(out.pooler_output, kept)),
            deepstack=tuple(tuple(torch.split(f, kept)) for f in out.deepstack_features),
            kept_blocks=tuple(kept), keep=tuple(masks), image_grid_thw=tuple(grids))

    # ------------------------------------------------------------------ language model
    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, *, keep=None,
                vision: VisionFeatures | None = None) -> PrunedInputs:
        """Model kwargs for one pruned prefill (used by __call__ and generate).

        Nothing pruned (or no image) -> the stock inputs unchanged (`pruned=False`).
        Otherwise it replaces what `Qwen3VLModel.forward` (5.23 L1131-1238) computes itself:
        pruned `input_ids`/`attention_mask`/`mm_token_type_ids`; 4-row `position_ids`
        [text; t; h; w] instead of `compute_3d_position_ids` (L1080), i.e. `get_rope_index`
        (L913) of the FULL sequence at the kept columns with text row = mask cumsum; and
        `mm_encoder_outputs` (from `vision` or `encode_images`) instead of
        `get_image_features` (L1161). `keep` defaults to `select` on `pixel_values`.
        `mm_token_type_ids` absent -> derived from input_ids (1 = image token, 2 = video token),
        as the processor would return it: 5.23's forward needs it for MRoPE."""
        if mm_token_type_ids is None and (image_grid_thw is not None or vision is not None):
            cfg = self.model.config
            mm_token_type_ids = ((input_ids == cfg.image_token_id).long()
                                 + 2 * (input_ids == cfg.video_token_id).long())
        stock = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                 "image_grid_thw": image_grid_thw, "mm_token_type_ids": mm_token_type_ids}
        stock = {k: v for k, v in stock.items() if v is not None}
        if vision is not None:
            if image_grid_thw is not None and grid_list(image_grid_thw) != list(vision.image_grid_thw):
                raise ValueError("image_grid_thw does not match the grids of the given vision features")
            if keep is not None and not same_masks(validate_keep(keep, list(vision.image_grid_thw)), vision.keep):
                raise ValueError("keep masks differ from the masks the vision features were encoded with")
            grid = torch.tensor(vision.image_grid_thw, dtype=torch.long)
        elif image_grid_thw is None:
            if pixel_values is not None:
                raise ValueError("pixel_values given without image_grid_thw")
            return PrunedInputs(model_kwargs=stock, vision=None, pruned=False, rope_deltas=None)
        else:
            grid = image_grid_thw
            if pixel_values is None:
                raise ValueError("pixel_values (or vision=) is required when image_grid_thw is given")
            masks = self.select(pixel_values, grid) if keep is None else validate_keep(keep, grid_list(grid))
            if all(m.all() for m in masks) and pixel_values.shape[0] == sum(t * h * w for t, h, w in grid_list(grid)):
                return PrunedInputs(model_kwargs=stock, vision=None, pruned=False, rope_deltas=None)
            vision = self.encode_images(pixel_values, grid, masks)
        kwargs, deltas = prune_token_inputs(self.model, input_ids, attention_mask, mm_token_type_ids,
                                            grid, vision.keep)
        kwargs["mm_encoder_outputs"] = {"image": vision.encoder_output()}
        return PrunedInputs(model_kwargs=kwargs, vision=vision, pruned=True, rope_deltas=deltas)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None, *, keep=None,
                 vision: VisionFeatures | None = None, **model_kwargs):
        """Forward pass; returns the model output with `.logits` over the PRUNED sequence.

        Same as `Qwen3VLForConditionalGeneration.forward` (5.23 L1282) on the inputs built by
        `prepare`; afterwards `model.model.rope_deltas` holds the pruned sequence's deltas
        so a later cached decode step continues from the full image's positions."""
        _check_kwargs(model_kwargs)
        prepared = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                                keep=keep, vision=vision)
        out = self.model(**prepared.model_kwargs, **model_kwargs)
        if prepared.pruned:
            self.model.model.rope_deltas = prepared.rope_deltas
        return out

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None, *, keep=None,
                 vision: VisionFeatures | None = None, **generate_kwargs):
        """`model.generate` on the pruned prompt; returns what it returns.

        Changes relative to stock 5.23 generation: explicit 4-row `position_ids` replace
        `_prepare_position_ids_for_generation` (L1371; skipped when position_ids are given,
        `generation/utils.py:2885`), and each decode step takes last position + 1
        (`generation/utils.py:1264-1276`), i.e. continues from the full image's positions.
        `mm_encoder_outputs` is dropped after prefill like pixel_values. On the pruned path
        the returned sequences start with the PRUNED prompt, so the new tokens are
        `sequences[:, L:]` with L = `self.prepare(...).model_kwargs["input_ids"].shape[1]`
        (for batch 1: full prompt length - pruned blocks)."""
        _check_kwargs(generate_kwargs)
        prepared = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                                keep=keep, vision=vision)
        out = self.model.generate(**prepared.model_kwargs, **generate_kwargs)
        if prepared.pruned:
            self.model.model.rope_deltas = prepared.rope_deltas
        return out


_UNSUPPORTED = ("pixel_values_videos", "video_grid_thw", "inputs_embeds", "position_ids", "mm_encoder_outputs")


def _check_kwargs(kwargs: dict) -> None:
    """ValueError for inputs the pruned path computes itself or does not support (videos)."""
    if bad := sorted(set(kwargs) & set(_UNSUPPORTED)):
        raise ValueError(f"unsupported inputs for PrunedQwen3VL: {bad} (videos are not supported; positions, "
                         "embeddings and encoder outputs are computed here)")
