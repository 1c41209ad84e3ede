"""`pruned_prompt_positions` (host numpy, from the chat's ids) equals `prune_token_inputs` (transformers'
get_rope_index on the full expanded sequence, kept columns) exactly: token ids and all four rows, for
several grid sizes and aspect ratios up to 4K, pruned and unpruned, one and two images, on the tiny
checkpoint's config and chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelprune.model.pipeline import chat_token_ids, tokenize, user_message
from pixelprune.model.positions import prune_token_inputs, pruned_prompt_positions

# (t, h, w) patch grids: square, wide, tall, thin, 1080p (1920x1088), 1440p, 4K (3840x2176), phone
GRIDS = [(1, 16, 16), (1, 8, 24), (1, 30, 6), (1, 2, 40), (1, 68, 120), (1, 90, 160), (1, 136, 240),
         (1, 158, 74)]


def keep_mask(grid, share: float, seed: int) -> np.ndarray:
    """A bool (h/2, w/2) mask keeping about `share` of the blocks, never none (share 1: all)."""
    _, h, w = grid
    mask = np.random.default_rng(seed).random((h // 2, w // 2)) < share
    mask.flat[seed % mask.size] = True
    return mask


def reference(model, processor, chat_ids, grids, masks) -> tuple[np.ndarray, np.ndarray]:
    """What build_prompt computes today: expand the chat, get_rope_index on the full sequence, gather."""
    full = tokenize(processor, None, grids, ids=chat_ids)
    kwargs, _ = prune_token_inputs(model, full["input_ids"], None, None, torch.tensor(grids), list(masks))
    return kwargs["input_ids"][0].numpy(), kwargs["position_ids"][:, 0].numpy()


def check(model, processor, chat_ids, grids, masks) -> np.ndarray:
    ids, positions = pruned_prompt_positions(model.config, chat_ids, grids, masks)
    want_ids, want_positions = reference(model, processor, chat_ids, grids, masks)
    assert ids.dtype == positions.dtype == np.int64
    assert positions.shape == (4, ids.shape[0])
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(positions, want_positions)
    return positions


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[1]}x{g[2]}")
@pytest.mark.parametrize("share", [1.0, 0.5, 0.05])
def test_one_image_equals_get_rope_index_at_the_kept_columns(model, processor, grid, share):
    chat_ids = chat_token_ids(processor, user_message("Click the Save button."))
    mask = keep_mask(grid, share, seed=grid[1] + grid[2])
    positions = check(model, processor, chat_ids, [grid], [mask])
    kept = int(mask.sum())
    assert positions.shape[1] == len(chat_ids) - 1 + kept
    # the text after the image continues from the image's start + max(h, w) / 2, pruned or not
    start = int(np.flatnonzero(chat_ids == model.config.image_token_id)[0])
    after = start + max(grid[1], grid[2]) // 2
    assert positions[1:, start + kept].tolist() == [after] * 3
    assert positions[0].tolist() == list(range(positions.shape[1]))


@pytest.mark.parametrize("pair", [(GRIDS[4], GRIDS[2]), (GRIDS[3], GRIDS[6]), (GRIDS[0], GRIDS[0])],
                         ids=["1080p+tall", "thin+4K", "same"])
@pytest.mark.parametrize("shares", [(1.0, 1.0), (0.3, 1.0), (0.6, 0.02)])
def test_two_images_equal_get_rope_index(model, processor, pair, shares):
    chat_ids = chat_token_ids(processor, user_message("Which of the two shows the dialog?", num_images=2))
    masks = [keep_mask(grid, share, seed=7 + i) for i, (grid, share) in enumerate(zip(pair, shares))]
    check(model, processor, chat_ids, list(pair), masks)


def test_images_at_the_ends_and_text_only(model, processor):
    image = model.config.image_token_id
    grid = (1, 6, 10)
    mask = keep_mask(grid, 0.5, seed=3)
    for chat in ([image, 11, 12, 13], [11, 12, image], [image, 20, image]):
        grids = [grid] * chat.count(image)
        check(model, processor, np.array(chat), grids, [mask] * len(grids))
    ids, positions = pruned_prompt_positions(model.config, np.array([5, 6, 7]), [], [])
    assert ids.tolist() == [5, 6, 7] and positions.tolist() == [[0, 1, 2]] * 4


def test_only_the_last_block_kept(model, processor):
    grid = (1, 8, 12)
    mask = np.zeros((4, 6), dtype=bool)
    mask[-1, -1] = True
    chat_ids = chat_token_ids(processor, user_message("x"))
    positions = check(model, processor, chat_ids, [grid], [mask])
    start = int(np.flatnonzero(chat_ids == model.config.image_token_id)[0])
    assert positions[1:, start].tolist() == [start, start + 3, start + 5]
    assert positions[1:, start + 1].tolist() == [start + 6] * 3


def test_bad_inputs_raise_value_error(model, processor):
    cfg = model.config
    image, grid = cfg.image_token_id, (1, 4, 4)
    mask = np.ones((2, 2), dtype=bool)
    cases = [
        (np.array([1, image, 2]), [], [], "1 image placeholders but 0"),
        (np.array([1, image, 2]), [grid, grid], [mask, mask], "1 image placeholders but 2"),
        (np.array([1, image, image, 2]), [grid, grid], [mask, mask], "no text between"),
        (np.array([1, cfg.video_token_id, 2]), [], [], "video"),
        (np.array([[1, image]]), [grid], [mask], "1-D integer"),
        (np.array([1.0, 2.0]), [], [], "1-D integer"),
        (np.array([1, image, 2]), [grid], [np.ones((2, 3), dtype=bool)], "shape"),
        (np.array([1, image, 2]), [grid], [np.zeros((2, 2), dtype=bool)], "keeps no block"),
        (np.array([1, image, 2]), [(1, 3, 4)], [mask], "even h, w"),
    ]
    for chat, grids, masks, message in cases:
        with pytest.raises(ValueError, match=message):
            pruned_prompt_positions(cfg, chat, grids, masks)
