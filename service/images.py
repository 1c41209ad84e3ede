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

Work, not only pixels: a progressive JPEG is decoded scan by scan, each scan
over the whole image, so a small file with many scans costs CPU in proportion to
its scans (1,000 repeated scans of a 7071 x 7071 grey image: 270 KB, ~30 s).
`probe` counts a JPEG's scans (SOS markers) from its bytes and refuses more than
MAX_JPEG_SCANS, at every size, before any decoding.

A caller that goes away stops the decoding: Pillow feeds its decoder 64 KiB of
the file at a time (ImageFile.decodermaxblock) through the file object it was
opened on; here that object asks `is_active()` before each read and raises
Cancelled once it is False. PNG (zlib) and baseline JPEG decode as their data is
read, so they stop within one chunk; a progressive JPEG decodes its scans as they
are read and then its output rows in one step, which cannot be interrupted;
WebP is decoded by libwebp in one call. The conversion to RGB (in strips of
rows, so an image with alpha costs its decoded size plus the RGB result) checks
`is_active()` between strips. Measured on 7000 x 7000 screenshots (BENCHMARKS.md,
`interrupt`): at most 25 ms (PNG, baseline JPEG) and 107 ms (progressive JPEG)
pass between two checks.

EXIF orientation (JPEG APP1, WebP EXIF, a PNG eXIf chunk before the image data)
is applied, with the semantics of ImageOps.exif_transpose: the image is used, and
points are answered, as a viewer shows it, and `probe` reports the size after
that rotation. EXIF that cannot be parsed is ignored, as viewers do.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import ExifTags, Image

from pixelprune.geometry import MAX_ASPECT_RATIO, to_rgb_array
from service.errors import Cancelled

FORMATS = ("PNG", "JPEG", "WEBP")  # the encoded formats accepted
BOMB_FLOOR_PIXELS = 4096 * 4096  # images up to this many pixels are never refused by the bomb rule
MAX_PIXELS_PER_BYTE = 1024  # above the floor: most pixels an encoded image may claim per byte of file
STRIP_PIXELS = 1 << 20  # pixels converted to RGB at a time (rows of one strip)
# Most scans (SOS markers) a JPEG may hold: baseline encoders write 1, libjpeg's progressive
# script 10 for colour (6 for grey); 32 leaves room for tuned scripts (mozjpeg, jpegli) while
# bounding the decoding work to a few passes over the image.
MAX_JPEG_SCANS = 32
_JPEG_SOI, _SOS, _EOI = b"\xff\xd8", 0xDA, 0xD9
_STANDALONE = {0x01, 0xD8, _EOI}  # markers without a length field (TEM, SOI, EOI; RSTn never match below)
# The next marker: 0xFF (fill bytes allowed) then a code that is neither a stuffed zero nor RSTn,
# which is how entropy-coded data ends (ITU T.81 B.1.1.5, F.1.2.3).
_NEXT_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")
# EXIF orientation -> the numpy steps of ImageOps.exif_transpose's Image.transpose.
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (counter-clockwise) = 90 clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90 (counter-clockwise)
}
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


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


class _Source(io.BytesIO):
    """The file Pillow opens and decodes from: asks `is_active()` before each read and raises
    Cancelled once it is False (module docstring)."""

    def __init__(self, data: bytes, is_active: Callable[[], bool]):
        super().__init__(data)
        self._is_active = is_active

    def read(self, size: int | None = -1) -> bytes:
        if not self._is_active():
            raise Cancelled("the caller went away while its image was being decoded")
        return super().read(size)


def _always() -> bool:
    return True


def _open(data: bytes, is_active: Callable[[], bool] = _always) -> Image.Image:
    """Pillow's lazy open (header only), with Pillow's errors turned into ImageError."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        return Image.open(_Source(data, is_active), formats=FORMATS)
    except Cancelled:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"image is not a PNG, JPEG or WebP file ({len(data)} bytes)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt headers
        raise ImageError(f"image header cannot be read: {type(exc).__name__}: {exc}") from None


def jpeg_scans(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """Scans (SOS markers) of a JPEG file, counted from its bytes without decoding (at most
    stop_after + 1; 0 for data that is not a JPEG). Marker segments are skipped by their length
    and entropy-coded data is searched for the marker that ends it, so bytes inside metadata (an
    EXIF thumbnail) or image data are never taken for a marker."""
    if not data.startswith(_JPEG_SOI):
        return 0
    scans, pos = 0, len(_JPEG_SOI)
    while scans <= stop_after and (match := _NEXT_MARKER.search(data, pos)) is not None:
        pos, marker = match.end(), match.group(1)[0]
        if marker in _STANDALONE:
            continue
        scans += marker == _SOS
        pos += int.from_bytes(data[pos:pos + 2], "big")  # the segment's length field counts itself
    return scans


def check_scans(data: bytes) -> None:
    """ImageError for a JPEG of more than MAX_JPEG_SCANS scans (the module docstring: work). Every
    SOS marker is the two bytes FF DA, so a file holding them at most MAX_JPEG_SCANS times passes
    after one fast count; only others are walked marker by marker."""
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS and jpeg_scans(data) > MAX_JPEG_SCANS:
        raise ImageError(f"JPEG has more than {MAX_JPEG_SCANS} scans: refused (each scan is decoded over the "
                         f"whole image; baseline JPEG has 1, progressive about 10)")


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8) of the metadata Pillow read with the header; 1 when there is
    none or it cannot be parsed. Read before load(), so the probe and the decoder agree."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        orientation = exif.get(ExifTags.Base.Orientation, 1)
        return orientation if orientation in _ORIENT else 1
    except Exception:  # noqa: BLE001 - broken EXIF is ignored, as viewers do
        return 1


def _check_header(im: Image.Image, data: bytes, max_pixels: int) -> tuple[int, int]:
    """Every check of an encoded image that needs no decoding; (width, height) as a viewer shows
    the image (after its EXIF orientation)."""
    check_size(im.width, im.height, max_pixels)
    check_not_bomb(im.width, im.height, len(data))
    check_scans(data)
    return (im.height, im.width) if exif_orientation(im) in _TRANSPOSED else (im.width, im.height)


def check_raw(raw: RawImage, max_pixels: int) -> None:
    """Size checks, then the RGB length: ImageError when it is not width * height * 3 bytes."""
    check_size(raw.width, raw.height, max_pixels)
    expected = raw.width * raw.height * 3
    if len(raw.rgb) != expected:
        raise ImageError(f"raw image of {raw.width}x{raw.height} needs {expected} RGB bytes, got {len(raw.rgb)}")


def probe(image: bytes | RawImage | None, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone (after EXIF orientation), after every check that needs
    no decoding; a raw image's RGB length included, so a wrong one never reserves room."""
    if image is None:
        raise ImageError("no image given (set image.encoded or image.raw)")
    if isinstance(image, RawImage):
        check_raw(image, max_pixels)
        return image.width, image.height
    with _open(image) as im:
        return _check_header(im, image, max_pixels)


def _to_rgb_strips(im: Image.Image, is_active: Callable[[], bool]) -> np.ndarray:
    """uint8 (H, W, 3) of a loaded image, converted a strip of rows at a time (same pixels as
    to_rgb_array on the whole image: the conversion is per pixel); Cancelled between strips once
    is_active() is False. RGB images too: copying 49 megapixels out of Pillow in one piece takes
    ~0.2 s that could not be interrupted; in strips it costs ~0.05 s more."""
    out = np.empty((im.height, im.width, 3), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // im.width)
    for top in range(0, im.height, rows):
        if not is_active():
            raise Cancelled("the caller went away while its image was being converted")
        bottom = min(im.height, top + rows)
        out[top:bottom] = to_rgb_array(im.crop((0, top, im.width, bottom)))
    return out


def decode_encoded(data: bytes, max_pixels: int, is_active: Callable[[], bool] = _always) -> np.ndarray:
    """PNG / JPEG / WebP bytes -> uint8 (H, W, 3) as a viewer shows them: the first frame of
    animations, alpha on white, EXIF orientation applied. Cancelled as soon as is_active() is
    False where decoding can stop (module docstring)."""
    with _open(data, is_active) as im:
        _check_header(im, data, max_pixels)
        orientation = exif_orientation(im)  # from the header, as probe saw it (load() may read more)
        try:
            im.load()  # the whole decode; truncated data raises here
            pixels = _to_rgb_strips(im, is_active)
        except Cancelled:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image refused as a decompression bomb: {exc}") from None
        except MemoryError:
            raise ImageError("image too large to decode") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt input
            raise ImageError(f"image cannot be decoded (truncated or corrupt): {type(exc).__name__}: "
                             f"{exc}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3:  # pragma: no cover - convert("RGB") guarantees it
        raise ImageError(f"image decoded to an unexpected shape {pixels.shape}")
    if orientation in _ORIENT:
        pixels = np.ascontiguousarray(_ORIENT[orientation](pixels))
    return pixels


def decode_raw(raw: RawImage, max_pixels: int) -> np.ndarray:
    """Raw RGB -> uint8 (H, W, 3), a read-only view of the bytes (no copy)."""
    check_raw(raw, max_pixels)
    return np.frombuffer(raw.rgb, dtype=np.uint8).reshape(raw.height, raw.width, 3)


def decode_image(image: bytes | RawImage | None, max_pixels: int,
                 is_active: Callable[[], bool] = _always) -> np.ndarray:
    """Either source -> uint8 (H, W, 3)."""
    if image is None:
        raise ImageError("no image given (set image.encoded or image.raw)")
    if isinstance(image, RawImage):
        return decode_raw(image, max_pixels)
    return decode_encoded(image, max_pixels, is_active)
