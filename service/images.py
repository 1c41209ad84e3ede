"""Screenshot bytes -> uint8 (H, W, 3) pixels, refusing what the service cannot or should not decode.

Encoded images (PNG, JPEG, WebP) are opened with Pillow, which reads only the
header: `probe` gives the size without decoding, so the pixel limit, the
aspect-ratio limit, the decompression-bomb rule below and the service's pixel
budget (service/admission.py) all apply *before* a pixel is decoded. No global
Pillow state is changed (Pillow's own bomb check stays as it is; its error and,
when warnings are errors, its warning are reported as too large).

The bomb rule: above BOMB_FLOOR_PIXELS (4096 x 4096, the model's own resize
ceiling), an encoded image may claim at most MAX_PIXELS_PER_BYTE pixels per byte
of file. Deflate (PNG) cannot shrink 8-bit RGB below ~1/1032 of its size (~344
pixels per byte) and baseline JPEG spends at least a few bits per 8x8 block, so
a real screenshot of that size is far below the limit; a 641-byte JPEG claiming
7071 x 7071 (78,000 pixels per byte) is refused as INVALID_ARGUMENT.

Decoding converts to RGB in strips of rows, so an image with alpha costs its
decoded size plus the RGB result, not the several full-size RGBA copies that
compositing the whole image on white would take.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pixelprune.geometry import MAX_ASPECT_RATIO, to_rgb_array

FORMATS = ("PNG", "JPEG", "WEBP")  # the encoded formats accepted
BOMB_FLOOR_PIXELS = 4096 * 4096  # images up to this many pixels are never refused by the bomb rule
MAX_PIXELS_PER_BYTE = 1024  # above the floor: most pixels an encoded image may claim per byte of file
STRIP_PIXELS = 1 << 20  # pixels converted to RGB at a time (rows of one strip)


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


def check_not_bomb(width: int, height: int, encoded_bytes: int) -> None:
    """The bomb rule (module docstring): ImageError for an image implausibly large for its file."""
    pixels = width * height
    if pixels > BOMB_FLOOR_PIXELS and pixels > MAX_PIXELS_PER_BYTE * encoded_bytes:
        raise ImageError(f"image claims {width}x{height} = {pixels} pixels from {encoded_bytes} bytes, more than "
                         f"{MAX_PIXELS_PER_BYTE} pixels per byte above {BOMB_FLOOR_PIXELS} pixels: refused as a "
                         f"decompression bomb")


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only), with Pillow's errors turned into ImageError."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"image is not a PNG, JPEG or WebP file ({len(data)} bytes)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt headers
        raise ImageError(f"image header cannot be read: {type(exc).__name__}: {exc}") from None


def _check_header(im: Image.Image, data: bytes, max_pixels: int) -> tuple[int, int]:
    check_size(im.width, im.height, max_pixels)
    check_not_bomb(im.width, im.height, len(data))
    return im.width, im.height


def probe(image: bytes | RawImage | None, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone, after every check that needs no decoding."""
    if image is None:
        raise ImageError("no image given (set image.encoded or image.raw)")
    if isinstance(image, RawImage):
        check_size(image.width, image.height, max_pixels)
        return image.width, image.height
    with _open(image) as im:
        return _check_header(im, image, max_pixels)


def _to_rgb_strips(im: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) of a loaded image, converted a strip of rows at a time (same pixels as
    to_rgb_array on the whole image: the conversion is per pixel)."""
    if im.mode == "RGB":
        return to_rgb_array(im)
    out = np.empty((im.height, im.width, 3), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // im.width)
    for top in range(0, im.height, rows):
        bottom = min(im.height, top + rows)
        out[top:bottom] = to_rgb_array(im.crop((0, top, im.width, bottom)))
    return out


def decode_encoded(data: bytes, max_pixels: int) -> np.ndarray:
    """PNG / JPEG / WebP bytes -> uint8 (H, W, 3); the first frame of animations; alpha on white."""
    with _open(data) as im:
        _check_header(im, data, max_pixels)
        try:
            im.load()  # the whole decode; truncated data raises here
            pixels = _to_rgb_strips(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image refused as a decompression bomb: {exc}") from None
        except MemoryError:
            raise ImageError("image too large to decode") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt input
            raise ImageError(f"image cannot be decoded (truncated or corrupt): {type(exc).__name__}: "
                             f"{exc}") from None
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
