"""Everything `pixelprune distill` checks before a model loads: the training rows, the held-out
rows, the screenshots' digests, the refusals (overlap with --heldout or --eval-data, rows
without an answer for --labels data), and the data part of the provenance record."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pixelprune.distill.data import BadRow, DistillSample, read_data
from pixelprune.distill.split import (ImageInfo, check_no_overlap, digest_map, file_sha256, scan, set_digest,
                                      split_heldout)


@dataclass(frozen=True)
class Prepared:
    train: tuple[DistillSample, ...]  # rows to train on
    heldout: tuple[DistillSample, ...]  # rows measured before and after (none without --heldout)
    infos: dict = field(repr=False)  # Path -> ImageInfo of every screenshot read
    bad: tuple[BadRow, ...]  # rows skipped, each reported in one line
    record: dict = field(repr=False)  # the data part of the provenance: files, digests, counts


def heldout_fraction(text: str | None) -> float | None:
    """--heldout as a fraction (a number), or None when it names a file (or is absent)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if Path(text).exists():
        return None
    return value


def _read(paths, fmt, images, what: str, infos: dict, bad: list, report) -> tuple[list[DistillSample], list]:
    """(usable rows, [(file, format)]) of some annotation files; skipped rows are reported."""
    data = read_data(paths, fmt, images)
    with tqdm(total=len(data.samples), desc=f"reading {what} screenshots", unit="row", file=sys.stderr,
              leave=False, disable=len(data.samples) < 50) as bar:
        good, unreadable = scan(data.samples, infos, bar)
    for row in (*data.bad, *unreadable):
        report(row)
        bad.append(row)
    return good, list(data.files)


def prepare_data(data: list[str], fmt: str | None, images: str | None, heldout: str | None, eval_data: list[str],
                 labels: str, seed: int, report) -> Prepared:
    """Read, digest, split and check. `report(BadRow)` is called once per skipped row.
    ValueError (one line) when nothing is left to train on or a refusal applies."""
    infos: dict[Path, ImageInfo] = {}
    bad: list[BadRow] = []
    train, files = _read(data, fmt, images, "training", infos, bad, report)
    fraction = heldout_fraction(heldout)
    if fraction is not None:
        train, held = split_heldout(train, infos, fraction, seed)
    elif heldout is not None:
        held, _ = _read([heldout], None, None, "held-out", infos, bad, report)
        if not held:
            raise ValueError(f"--heldout {heldout}: no usable rows")
        check_no_overlap(train, infos, digest_map(held, infos), f"--heldout {heldout}")
    else:
        held = []
    for path in eval_data:
        evaluated, _ = _read([path], None, None, "evaluation", infos, bad, report)
        check_no_overlap(train, infos, digest_map(evaluated, infos), f"--eval-data {path}")
    if labels == "data":
        unlabelled = {s.sample_id for s in train if s.data_answer(infos[s.image].size) is None}
        for sample_id in sorted(unlabelled):
            row = BadRow(f"sample {sample_id}", "no answer or box to train on with --labels data "
                                                "(--labels teacher uses the model's own answer)")
            report(row)
            bad.append(row)
        train = [s for s in train if s.sample_id not in unlabelled]
    if not train:
        raise ValueError("no rows left to train on")
    record = {"files": [{"path": f, "format": chosen, "sha256": file_sha256(f)} for f, chosen in files],
              "train_rows": len(train),
              "train_screenshots": len({infos[s.image].digest for s in train}),
              "train_images_sha256": set_digest(infos[s.image].digest for s in train),
              "heldout": heldout, "heldout_rows": len(held),
              "heldout_screenshots": len({infos[s.image].digest for s in held}),
              "heldout_images_sha256": set_digest(infos[s.image].digest for s in held) if held else None,
              "eval_data": list(eval_data), "skipped_rows": len(bad)}
    return Prepared(train=tuple(train), heldout=tuple(held), infos=infos, bad=tuple(bad), record=record)
