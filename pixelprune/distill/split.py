"""Which screenshot is which: image digests, the held-out split, and the overlap refusal.

A screenshot is identified by the digest of its decoded RGB pixels
(`pixelprune.hashing.frame_digest`), so the same screen saved twice, under another name or
in another lossless format, is one screenshot. The held-out part is chosen by screenshot,
never by row: all instructions on one screen go to the same side. Training refuses any
screenshot that is also held out or in an evaluation set. No torch here.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pixelprune.distill.data import BadRow, DistillSample
from pixelprune.geometry import to_rgb_array
from pixelprune.hashing import frame_digest


@dataclass(frozen=True)
class ImageInfo:
    digest: str  # hex blake2b-256 of the decoded RGB pixels and their shape
    size: tuple[int, int]  # (W, H) in pixels


def image_info(path: Path) -> ImageInfo:
    """Digest and size of one screenshot; ValueError (one line) when it cannot be read."""
    try:
        with Image.open(path) as image:
            pixels = to_rgb_array(image)
    except FileNotFoundError:
        raise ValueError(f"image {path} not found") from None
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path} ({exc})") from None
    return ImageInfo(digest=frame_digest(pixels).hex(), size=(int(pixels.shape[1]), int(pixels.shape[0])))


def scan(samples, infos: dict[Path, ImageInfo], bar=None) -> tuple[list[DistillSample], list[BadRow]]:
    """(samples whose image reads, one BadRow per sample whose image does not); `infos` (path ->
    ImageInfo) is filled in place and each file is decoded once. `bar` advances once per sample."""
    errors: dict[Path, str] = {}
    good, bad = [], []
    for sample in samples:
        if sample.image not in infos and sample.image not in errors:
            try:
                infos[sample.image] = image_info(sample.image)
            except ValueError as exc:
                errors[sample.image] = str(exc)
        if sample.image in errors:
            bad.append(BadRow(f"sample {sample.sample_id}", errors[sample.image]))
        else:
            good.append(sample)
        if bar is not None:
            bar.update(1)
    return good, bad


def split_heldout(samples: list[DistillSample], infos: dict[Path, ImageInfo], fraction: float,
                  seed: int) -> tuple[list[DistillSample], list[DistillSample]]:
    """(train, held out): `fraction` of the distinct screenshots (at least one, and at least one
    left to train on), chosen with `seed`; rows keep their order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--heldout fraction must be between 0 and 1 (exclusive), got {fraction:g}")
    digests = sorted({infos[s.image].digest for s in samples})
    if len(digests) < 2:
        raise ValueError(f"--heldout {fraction:g} needs at least 2 distinct screenshots; the data has {len(digests)}")
    random.Random(seed).shuffle(digests)
    count = min(max(1, round(fraction * len(digests))), len(digests) - 1)
    held = set(digests[:count])
    return ([s for s in samples if infos[s.image].digest not in held],
            [s for s in samples if infos[s.image].digest in held])


def check_no_overlap(train: list[DistillSample], infos: dict[Path, ImageInfo],
                     others: dict[str, Path], what: str) -> None:
    """ValueError (one line) when a training screenshot's digest is in `others` (digest -> a path
    showing it), e.g. the held-out part or an evaluation set."""
    shared = {}
    for sample in train:
        digest = infos[sample.image].digest
        if digest in others:
            shared.setdefault(digest, sample.image)
    if shared:
        digest, path = next(iter(shared.items()))
        raise ValueError(f"refusing to train on {len(shared)} screenshot(s) that are also in {what} "
                         f"(e.g. {path} = {others[digest]}); remove them from the training data")


def digest_map(samples, infos: dict[Path, ImageInfo]) -> dict[str, Path]:
    """digest -> the first path that shows it."""
    out: dict[str, Path] = {}
    for sample in samples:
        out.setdefault(infos[sample.image].digest, sample.image)
    return out


def set_digest(digests) -> str:
    """One sha256 over a set of screenshot digests (order-free): names the images a run used."""
    return hashlib.sha256("\n".join(sorted(set(digests))).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
