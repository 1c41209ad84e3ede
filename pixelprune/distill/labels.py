"""Greedy answers: the full-token teacher's own (`--labels teacher`, and the held-out answers
every metric is measured on), and the pruned student's (click accuracy).

An answer is the generated tokens up to and including the first end-of-turn token; when
the budget runs out first, `<|im_end|>` is appended, so every answer is closed like a chat
turn (random-weight models rarely stop on their own).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pixelprune.distill.batch import Collator, TrainItem, answer_end_id, keep_masks, pad_id
from pixelprune.distill.data import DistillSample
from pixelprune.model.adapter import PrunedQwen3VL
from pixelprune.settings import PruneSettings

MAX_ANSWER_TOKENS = 24  # greedy budget per answer: a point needs ~15 (the service's default)
_GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # plain greedy, whatever the
#           checkpoint's generation_config samples with


def chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def end_ids(model, processor) -> set[int]:
    """Tokens that end an answer: the generation config's EOS ids and <|im_end|>."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {int(i) for i in eos} | {answer_end_id(processor)}


def closed(tokens: list[int], ends: set[int], answer_end: int) -> tuple[int, ...]:
    """Tokens through the first end token, or all of them plus <|im_end|>."""
    for index, token in enumerate(tokens):
        if token in ends:
            return tuple(tokens[:index + 1])
    return tuple(tokens) + (answer_end,)


def device_batch(batch: dict, model) -> dict:
    param = next(model.parameters())
    out = {k: v.to(param.device) for k, v in batch.items() if k not in ("labels", "keep")}
    out["pixel_values"] = out["pixel_values"].to(param.dtype)
    return out


@torch.no_grad()
def greedy_answers(model, processor, samples: list[DistillSample], settings: PruneSettings = PruneSettings.OFF,
                   batch_size: int = 1, max_new_tokens: int = MAX_ANSWER_TOKENS, bar=None) -> list[tuple[int, ...]]:
    """Each sample's greedy answer (token ids, closed by an end token) from `model`, shown every
    block (`settings` OFF: the teacher) or only the blocks `settings` keeps (the pruned student,
    with full-image positions). Batches are left-padded; `bar` advances once per sample."""
    pad = pad_id(model, processor)
    collator = Collator(processor, settings, pad)
    pruned = PrunedQwen3VL(model, settings)
    ends, answer_end = end_ids(model, processor), answer_end_id(processor)
    answers = []
    for part in chunks(samples, batch_size):
        batch = collator([TrainItem(sample, ()) for sample in part])
        inputs = device_batch(batch, model)
        prepared = pruned.prepare(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                  inputs["image_grid_thw"], inputs["mm_token_type_ids"],
                                  keep=keep_masks(batch["keep"], batch["image_grid_thw"]))
        kwargs = prepared.model_kwargs
        sequences = model.generate(**kwargs, max_new_tokens=max_new_tokens, pad_token_id=pad, **_GREEDY)
        new = sequences[:, kwargs["input_ids"].shape[1]:].tolist()
        answers.extend(closed(row, ends, answer_end) for row in new)
        if bar is not None:
            bar.update(len(part))
    return answers


def answer_text(processor, ids: tuple[int, ...]) -> str:
    """The answer's text without its closing token."""
    return processor.tokenizer.decode(list(ids), skip_special_tokens=True)
