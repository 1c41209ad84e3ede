"""Screenshot bytes -> uint8 (H, W, 3) pixels, refusing what the service cannot or should not decode.

Encoded images (PNG, JPEG, WebP) are opened with Pillow, which reads only the
header; the size is checked against the pixel limit *before* the pixel data is
decoded, so a decompression bomb costs a header parse, not gigabytes. No global
Pillow state is changed (Pillow's own bomb check stays as it is; its error and,
when warnings are errors, its warning are reported as too large).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pixelprune.geometry import MAX_ASPECT_RATIO, to_rgb_array

FORMATS = ("PNG", "JPEG", "WEBP")  # the encoded formats accepted


class ImageError(ValueError):
    """The image cannot be used: undecodable, truncated, empty, too large or too elongated."""


@dataclass(frozen=True)
class RawImage:
    width: int  # pixels
    height: int  # pixels
    rgb: bytes  # interleaved 8-bit RGB, row-major, width * height * 3 bytes


def check_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse 0-sized, over-limit and over-elongated images (ImageError, one line)."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image is empty ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"image has {width}x{height} = {width * height} pixels, more than the "
                         f"limit of {max_pixels}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"image aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")


def decode_encoded(data: bytes, max_pixels: int) -> np.ndarray:
    """PNG / JPEG / WebP bytes -> uint8 (H, W, 3); the first frame of animations; alpha on white."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            check_size(im.width, im.height, max_pixels)
            im.load()  # the whole decode; truncated data raises here
            pixels = to_rgb_array(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"image is not a PNG, JPEG or WebP file ({len(data)} bytes)") from None
    except MemoryError:
        raise ImageError("image too large to decode") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt input
        raise ImageError(f"image cannot be decoded (truncated or corrupt): {type(exc).__name__}: {exc}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3:  # pragma: no cover - convert("RGB") guarantees it
        raise ImageError(f"image decoded to an unexpected shape {pixels.shape}")
    return pixels


def decode_raw(raw: RawImage, max_pixels: int) -> np.ndarray:
    """Raw RGB -> uint8 (H, W, 3), a read-only view of the bytes (no copy)."""
    check_size(raw.width, raw.height, max_pixels)
    expected = raw.width * raw.height * 3
    if len(raw.rgb) != expected:
        raise ImageError(f"raw image of {raw.width}x{raw.height} needs {expected} RGB bytes, got {len(raw.rgb)}")
    return np.frombuffer(raw.rgb, dtype=np.uint8).reshape(raw.height, raw.width, 3)


def decode_image(image: bytes | RawImage | None, max_pixels: int) -> np.ndarray:
    """Either source -> uint8 (H, W, 3)."""
    if image is None:
        raise ImageError("no image given (set image.encoded or image.raw)")
    if isinstance(image, RawImage):
        return decode_raw(image, max_pixels)
    return decode_encoded(image, max_pixels)
