"""What the report measures on the held-out screenshots, before and after training.

On the full-token teacher's own greedy answers (the base model's answers):

    kl_per_token     KL(teacher || pruned student) per answer token, temperature 1
    top1_agreement   share of answer tokens where the pruned student's top token is the teacher's
    click_accuracy   the pruned student's own greedy answer lands in the target box (samples with
                     a box only; `full_click_accuracy` is the teacher's, on every block)

"Before" the student is the base model itself; "after" it is the checkpoint written to
--out, loaded from disk as `pixelprune serve` loads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pixelprune.distill.batch import Collator, TrainItem, pad_id
from pixelprune.distill.data import DistillSample
from pixelprune.distill.labels import MAX_ANSWER_TOKENS, answer_text, chunks, device_batch, greedy_answers
from pixelprune.distill.model import DistillModel, answer_terms
from pixelprune.eval.records import is_hit
from pixelprune.points import parse_point, point_to_pixels
from pixelprune.settings import PruneSettings


@dataclass(frozen=True)
class HeldoutMetrics:
    samples: int  # held-out rows measured
    answer_tokens: int  # teacher answer tokens the KL and agreement are averaged over
    kl_per_token: float  # KL(teacher || pruned student) per answer token (nats, T = 1)
    top1_agreement: float  # share of answer tokens where the student's argmax is the teacher's
    click_samples: int  # rows with a target box
    click_accuracy: float | None  # pruned student's greedy click inside the box (None: no boxes)
    full_click_accuracy: float | None  # the full-token teacher's greedy click inside the box
    retain_ratio: float  # kept / total visual tokens of the student, over the held-out rows

    def to_dict(self) -> dict:
        return asdict(self)


def click_hit(sample: DistillSample, size: tuple[int, int], text: str) -> bool:
    """The answer's point, in pixels of the (W, H) screenshot, lies in the sample's box."""
    width, height = size
    box = sample.relative_box(size)
    point = parse_point(text)
    pixel_box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    return is_hit(None if point is None else point_to_pixels(point, size), pixel_box)


@torch.no_grad()
def agreement(teacher, student, processor, items: list[TrainItem], settings: PruneSettings,
              batch_size: int) -> tuple[float, float, int, float]:
    """(KL sum, agreeing tokens, answer tokens, kept/total) of the pruned student vs the teacher."""
    collator = Collator(processor, settings, pad_id(teacher, processor))
    model = DistillModel(student, teacher).eval()
    kl = agree = tokens = kept = total = 0.0
    for part in chunks(items, batch_size):
        batch = collator(part)
        inputs = device_batch(batch, student)
        inputs.update(keep=batch["keep"], labels=batch["labels"].to(inputs["input_ids"].device))
        out = model(**inputs)
        terms = answer_terms(out, temperature=1.0)
        kl += float(terms.kl_sum)
        agree += float(terms.agree)
        tokens += float(terms.tokens)
        kept += float(out.kept_blocks.sum())
        total += float(out.total_blocks.sum())
    return kl, agree, int(tokens), kept / max(total, 1.0)


def measure(teacher, student, processor, items: list[TrainItem], sizes: dict[Path, tuple[int, int]],
            settings: PruneSettings, batch_size: int, teacher_texts: dict[str, str],
            max_new_tokens: int = MAX_ANSWER_TOKENS, bar=None) -> HeldoutMetrics:
    """The held-out metrics of `student` (pruned per `settings`) against `teacher` (every block);
    `items` carry the teacher's greedy answers, `teacher_texts` the same as text by sample id."""
    kl, agree, tokens, retain = agreement(teacher, student, processor, items, settings, batch_size)
    boxed = [item.sample for item in items if item.sample.box is not None]
    answers = greedy_answers(student, processor, boxed, settings, batch_size, max_new_tokens, bar=bar)
    hits = [click_hit(s, sizes[s.image], answer_text(processor, a)) for s, a in zip(boxed, answers)]
    full_hits = [click_hit(s, sizes[s.image], teacher_texts[s.sample_id]) for s in boxed]
    return HeldoutMetrics(samples=len(items), answer_tokens=tokens, kl_per_token=kl / max(tokens, 1),
                          top1_agreement=agree / max(tokens, 1), click_samples=len(boxed),
                          click_accuracy=sum(hits) / len(hits) if hits else None,
                          full_click_accuracy=sum(full_hits) / len(full_hits) if full_hits else None,
                          retain_ratio=retain)
