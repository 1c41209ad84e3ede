"""Samples -> padded model batches: the full-token sequence the teacher reads, every block's
pixel rows, and the keep masks the student is pruned with.

One example is the chat of `pixelprune.model.pipeline` (one image, every block: pruning is
applied later, inside the student's forward, by `PrunedQwen3VL`) followed by the answer's
tokens through the closing `<|im_end|>`. Batches are padded on the LEFT, so every row's
answer ends at the last column, in the teacher's sequence and in the student's pruned one
alike (`prune_token_inputs` keeps the padding side): the answer logits of both are the last
columns, aligned token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelprune.distill.data import DistillSample
from pixelprune.geometry import to_rgb_array
from pixelprune.model.pipeline import chat_token_ids, prepare_image, tokenize, vision_spec
from pixelprune.selectors import select_blocks
from pixelprune.settings import PruneSettings

IGNORE = -100  # label of a column that is not an answer token (transformers' convention)
ANSWER_END = "<|im_end|>"  # closes the assistant's turn; trained on like the answer's tokens


@dataclass(frozen=True)
class TrainItem:
    sample: DistillSample  # the screenshot and prompt
    answer_ids: tuple[int, ...]  # the answer's token ids through the closing <|im_end|> (empty: prompt only)


@dataclass(frozen=True)
class Example:
    input_ids: torch.Tensor  # (L,) int64: chat prompt with every image token, then the answer
    mm_token_type_ids: torch.Tensor  # (L,) int64: 1 at image tokens
    pixel_values: torch.Tensor  # (t*h*w, 1536) float32: every patch row of the resized screenshot
    grid: tuple[int, int, int]  # (t, h, w) patch grid
    keep: np.ndarray  # bool (h/2, w/2): the blocks the student sees
    answer_len: int  # the last answer_len tokens are the answer


def load_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) of an image file; ValueError (one line) when it cannot be read."""
    try:
        with Image.open(path) as image:
            return to_rgb_array(image).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path} ({exc})") from None


def pad_id(model, processor) -> int:
    """The padding token: the generation config's, else the tokenizer's."""
    pad = model.generation_config.pad_token_id
    return int(processor.tokenizer.pad_token_id if pad is None else pad)


def answer_end_id(processor) -> int:
    return int(processor.tokenizer.convert_tokens_to_ids(ANSWER_END))


def text_answer_ids(processor, text: str) -> tuple[int, ...]:
    """Token ids of an answer text (control tokens in it stay plain text), then <|im_end|>."""
    ids = processor.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return tuple(int(i) for i in ids) + (answer_end_id(processor),)


class Collator:
    """`collator(items) -> batch` for `DistillModel` (and `transformers.Trainer`): input_ids,
    attention_mask, mm_token_type_ids (B, L) left-padded; labels (B, L) = the answer's tokens,
    IGNORE elsewhere; pixel_values (rows of all images), image_grid_thw (B, 3); keep (sum of
    blocks,) bool, the student's keep masks flattened in image order."""

    def __init__(self, processor, settings: PruneSettings, pad: int):
        self.processor = processor
        self.settings = settings
        self.spec = vision_spec(processor)
        self.pad = int(pad)  # token id of the left padding

    def example(self, item: TrainItem) -> Example:
        prepared = prepare_image(load_rgb(item.sample.image), PruneSettings.OFF, self.spec, device="cpu")
        if self.settings.enabled:
            keep = select_blocks(prepared.pixels, method=self.settings.method, metric=self.settings.metric,
                                 tau=self.settings.tau)
        else:
            keep = np.ones(prepared.keep.shape, dtype=bool)
        messages = item.sample.messages()
        tokens = tokenize(self.processor, messages, [prepared.image_grid_thw],
                          ids=chat_token_ids(self.processor, messages))
        answer = torch.tensor(item.answer_ids, dtype=torch.int64)
        return Example(input_ids=torch.cat([tokens["input_ids"][0], answer]),
                       mm_token_type_ids=torch.cat([tokens["mm_token_type_ids"][0], torch.zeros_like(answer)]),
                       pixel_values=prepared.pixel_values, grid=tuple(prepared.image_grid_thw), keep=keep,
                       answer_len=len(item.answer_ids))

    def __call__(self, items: list[TrainItem]) -> dict[str, torch.Tensor]:
        return collate([self.example(item) for item in items], self.pad)


def collate(examples: list[Example], pad: int) -> dict[str, torch.Tensor]:
    """Left-padded batch of examples (see Collator)."""
    width = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad, dtype=torch.int64)
    attention_mask = torch.zeros((batch, width), dtype=torch.int64)
    type_ids = torch.zeros((batch, width), dtype=torch.int64)
    labels = torch.full((batch, width), IGNORE, dtype=torch.int64)
    for row, e in enumerate(examples):
        start = width - len(e.input_ids)
        input_ids[row, start:] = e.input_ids
        attention_mask[row, start:] = 1
        type_ids[row, start:] = e.mm_token_type_ids
        if e.answer_len:
            labels[row, width - e.answer_len:] = e.input_ids[-e.answer_len:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": type_ids,
            "labels": labels, "pixel_values": torch.cat([e.pixel_values for e in examples]),
            "image_grid_thw": torch.tensor([e.grid for e in examples], dtype=torch.int64),
            "keep": torch.from_numpy(np.concatenate([e.keep.reshape(-1) for e in examples]))}


def keep_masks(keep: torch.Tensor, image_grid_thw: torch.Tensor) -> list[np.ndarray]:
    """The flattened `keep` of a batch back to one (h/2, w/2) mask per image."""
    shapes = [(int(h) // 2, int(w) // 2) for _, h, w in image_grid_thw.tolist()]
    sizes = [a * b for a, b in shapes]
    if keep.numel() != sum(sizes):
        raise ValueError(f"keep has {keep.numel()} entries; the image grids have {sum(sizes)} blocks")
    flat = keep.detach().to("cpu", torch.bool).numpy()
    return [part.reshape(shape) for part, shape in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes)]
