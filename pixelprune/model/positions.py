"""Token-side preparation of a pruned Qwen3-VL prompt: keep masks, image grids, and the
pruned sequence with the MRoPE positions of the FULL image (transformers 5.23/5.24,
`Qwen3VLModel.get_rope_index`, which `Qwen3VLMoeModel` inherits unchanged: dense and MoE
checkpoints share these positions). The vision side is in `pixelprune.model.adapter`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils.generic import get_max_seqlen


def kept_patch_rows(masks: list[np.ndarray], grids: list[tuple[int, int, int]]) -> torch.Tensor:
    """Indices of the kept patches' rows in the full (block-major) pixel_values of all images."""
    rows, offset = [], 0
    for mask, (t, h, w) in zip(masks, grids):
        blocks = np.flatnonzero(mask.reshape(-1))
        rows.append(offset + (4 * blocks[:, None] + np.arange(4)).reshape(-1))
        offset += t * h * w
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


def vision_attention_kwargs(kept_blocks, vision_config, device) -> dict:
    """`cu_seqlens` (and `max_seqlen`) for the ViT: one attention segment of 4 patches per kept block per image.

    With flash attention (`Qwen3VLVisionAttention.forward`, transformers 5.25 L281-297, varlen kernel)
    cu_seqlens goes to `device` with `max_seqlen` as a host int. With sdpa, eager and the rest
    (L300-303) each layer splits q/k/v by `(cu_seqlens[1:] - cu_seqlens[:-1]).tolist()`; cu_seqlens
    stays on the CPU there, so no layer waits for the device. Nothing else in the ViT reads it."""
    cu_seqlens = F.pad(torch.tensor([4 * int(k) for k in kept_blocks]).cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen = get_max_seqlen(cu_seqlens, vision_config)  # an int (from host values) for flash, else None
    if max_seqlen is None:
        return {"cu_seqlens": cu_seqlens}
    return {"cu_seqlens": cu_seqlens.to(device), "max_seqlen": max_seqlen}


def grid_list(image_grid_thw) -> list[tuple[int, int, int]]:
    grid = torch.as_tensor(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {tuple(grid.shape)}")
    out = [tuple(int(v) for v in row) for row in grid.tolist()]
    for t, h, w in out:
        if t != 1 or h <= 0 or w <= 0 or h % 2 or w % 2:
            raise ValueError(f"bad image grid (t={t}, h={h}, w={w}): need t == 1 and even h, w")
    return out


def same_masks(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and bool((x == y).all()) for x, y in zip(a, b))


def validate_keep(keep, grids: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """Read-only bool keep masks, one (h/2, w/2) per image; ValueError on anything else."""
    if isinstance(keep, (np.ndarray, torch.Tensor)) and keep.ndim == 2:
        keep = [keep]
    if not isinstance(keep, (list, tuple)) or len(keep) != len(grids):
        n = len(keep) if isinstance(keep, (list, tuple)) else type(keep).__name__
        raise ValueError(f"keep must be a list of one bool mask per image ({len(grids)}), got {n}")
    masks = []
    for i, (mask, (_, h, w)) in enumerate(zip(keep, grids)):
        mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (h // 2, w // 2):
            raise ValueError(f"keep[{i}] must be a bool array of shape {(h // 2, w // 2)} (blocks of image {i}), "
                             f"got {mask.dtype} {mask.shape}")
        if not mask.any():
            raise ValueError(f"keep[{i}] keeps no block; every image needs at least one")
        mask = mask.copy()
        mask.setflags(write=False)
        masks.append(mask)
    return masks


def image_runs(image_tokens: torch.Tensor) -> list[int]:
    """Lengths of the runs of consecutive image tokens, sample by sample (get_rope_index's order)."""
    runs = []
    for row in image_tokens.cpu().numpy().astype(np.int8):
        d = np.diff(np.concatenate([[0], row, [0]]))
        runs.extend((np.flatnonzero(d == -1) - np.flatnonzero(d == 1)).tolist())
    return runs


def prune_token_inputs(model, input_ids, attention_mask, mm_token_type_ids, grid, masks):
    """Drop the pruned image tokens; returns (model kwargs, rope deltas (B, 1)).

    MRoPE rows are `Qwen3VLModel.get_rope_index` (5.23 L913) of the FULL sequence, gathered at
    the kept columns; row 0 is the text position (mask cumsum, as `_prepare_position_ids_for_generation`
    of generation/utils.py:894). Samples are re-padded on the input's padding side (left when
    the input has no right padding), pad columns get position 0 like get_rope_index's."""
    cfg = model.config
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if bool((input_ids == cfg.video_token_id).any()):
        raise ValueError("video tokens are not supported by the pruned path")
    image_tokens = input_ids == cfg.image_token_id
    if mm_token_type_ids is None:
        mm_token_type_ids = image_tokens.long()
    elif mm_token_type_ids.shape != input_ids.shape or not torch.equal(mm_token_type_ids == 1, image_tokens):
        raise ValueError("mm_token_type_ids must be 1 exactly at the image tokens of input_ids")
    valid = attention_mask.bool()
    if bool((image_tokens & ~valid).any()):
        raise ValueError("image tokens inside the padding (attention_mask == 0)")
    grids = grid_list(grid)
    need = [t * h * w // 4 for t, h, w in grids]
    if (runs := image_runs(image_tokens)) != need:
        raise ValueError(f"image token runs in input_ids {runs} do not match image_grid_thw, which needs {need}")
    token_keep = valid.clone()
    token_keep[image_tokens] = torch.from_numpy(np.concatenate([m.reshape(-1) for m in masks])).to(device)
    pos3, _ = model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=torch.as_tensor(grid).to(device),
                                         attention_mask=attention_mask)
    lengths = token_keep.sum(1)
    width = int(lengths.max())
    cols = torch.arange(width, device=device)[None]
    right = bool((~valid[:, -1]).any())
    slots = cols < lengths[:, None] if right else cols >= (width - lengths)[:, None]
    pad = model.generation_config.pad_token_id
    pad = pad if isinstance(pad, int) and pad != cfg.image_token_id else 0
    ids = input_ids.new_full(slots.shape, pad)
    ids[slots] = input_ids[token_keep]
    types = mm_token_type_ids.new_zeros(slots.shape)
    types[slots] = mm_token_type_ids[token_keep]
    mask = attention_mask.new_zeros(slots.shape)
    mask[slots] = 1
    mrope = pos3.new_zeros((3, *slots.shape))
    mrope[:, slots] = pos3[:, token_keep]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(pos3.dtype)
    deltas = pos3.masked_fill(~token_keep[None], -1).amax(dim=(0, 2)) + 1 - lengths
    kwargs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types,
              "position_ids": torch.cat([text[None], mrope], dim=0)}
    return kwargs, deltas[:, None]


def pruned_prompt_positions(config, chat_ids, grids, keep) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (L',) int64, positions (4, L') int64) of one pruned prompt, computed on the host: the
    same as `prune_token_inputs` (get_rope_index on the full expanded sequence, kept columns gathered)
    for one prompt, in O(images) numpy calls and with no device round trip.

    `chat_ids`: the chat's token ids with ONE `config.image_token_id` placeholder per image
    (`pipeline.chat_token_ids`, before expansion); `grids`: one (t, h, w) patch grid per image
    (t == 1, even h and w); `keep`: one bool (h/2, w/2) mask per image (`validate_keep`).
    Each placeholder becomes the image's kept blocks in raster order; the text tokens stay.
    Rows are [text; t; h; w], equal to `prune_token_inputs` on the expanded sequence
    (`Qwen3VLModel.get_rope_index` of transformers 5.23-5.25 at the kept columns):
    text row = 0..L'-1; a run of text continues from the current position p, one per token;
    an image starting at p puts its kept block (r, c) at (p, p + r, p + c) and advances p by
    max(h, w) / merge (merge = `config.vision_config.spatial_merge_size`), so pruned blocks
    leave gaps and the tokens after the image see the full image's extent. No image: every
    row is 0..L-1. ValueError for video tokens, placeholders that do not match the grids, or
    two placeholders with no text between them (get_rope_index would read them as one image)."""
    ids = np.asarray(chat_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"chat_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if np.any(ids == config.video_token_id):
        raise ValueError("video tokens are not supported by the pruned path")
    at = np.flatnonzero(ids == config.image_token_id)
    grids = grid_list(grids) if len(grids) else []
    if len(at) != len(grids):
        raise ValueError(f"the chat has {len(at)} image placeholders but {len(grids)} image grids were given")
    if np.any(np.diff(at) == 1):
        raise ValueError("two image placeholders with no text between them")
    masks = validate_keep(keep, grids) if grids else []
    merge = config.vision_config.spatial_merge_size
    tokens, mrope, start, pos = [], [], 0, 0
    for placeholder, (_, h, w), mask in zip(at, grids, masks):
        text = ids[start:placeholder]
        tokens.append(text)
        mrope.append(np.broadcast_to(pos + np.arange(len(text)), (3, len(text))))
        pos += len(text)
        rows, cols = np.nonzero(mask)  # raster order, as the image's tokens are laid out
        tokens.append(np.full(rows.size, config.image_token_id))
        mrope.append(np.stack([np.full(rows.size, pos), pos + rows, pos + cols]))
        pos += max(h, w) // merge
        start = placeholder + 1
    tokens.append(ids[start:])
    mrope.append(np.broadcast_to(pos + np.arange(len(ids) - start), (3, len(ids) - start)))
    mrope = np.concatenate(mrope, axis=1).astype(np.int64)
    return np.concatenate(tokens).astype(np.int64), np.concatenate([np.arange(mrope.shape[1])[None], mrope])
