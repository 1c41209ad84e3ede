"""Image decoding: formats, alpha, limits checked from the header, and every kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pixelprune.geometry import to_rgb_array
from service import images
from service.images import (BOMB_FLOOR_PIXELS, MAX_PIXELS_PER_BYTE, ImageError, RawImage, check_not_bomb,
                            decode_encoded, decode_image, decode_raw, probe)
from service_testlib import jpeg_bomb

LIMIT = 50_000_000


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose IHDR claims width x height (valid CRC): pixels that never existed."""
    data = bytearray(_encode(np.zeros((1, 1), np.uint8), "PNG"))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    assert data[ihdr + 4:ihdr + 8] == b"IHDR"
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])))
    return bytes(data)


@pytest.fixture()
def pixels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)


def test_png_and_lossless_webp_round_trip_exactly(pixels):
    assert np.array_equal(decode_encoded(_encode(pixels, "PNG"), LIMIT), pixels)
    assert np.array_equal(decode_encoded(_encode(pixels, "WEBP", lossless=True), LIMIT), pixels)


def test_jpeg_decodes_like_pillow(pixels):
    data = _encode(pixels, "JPEG", quality=90)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = decode_encoded(data, LIMIT)
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3) and np.array_equal(out, expected)


def test_grey_and_alpha_become_rgb_on_white():
    grey = np.array([[0, 128, 255]], np.uint8)
    assert decode_encoded(_encode(grey, "PNG"), LIMIT).tolist() == [[[0] * 3, [128] * 3, [255] * 3]]
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0]]], np.uint8)
    assert decode_encoded(_encode(rgba, "PNG"), LIMIT).tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # The data holds one pixel: had it been decoded, the error would be a truncation error.
    with pytest.raises(ImageError, match="8000x8000 = 64000000 pixels, more than the limit of 50000000"):
        decode_encoded(_png_claiming(8000, 8000), LIMIT)
    with pytest.raises(ImageError, match="more than the limit of 100"):
        decode_encoded(_encode(np.zeros((11, 10, 3), np.uint8), "PNG"), 100)


def test_pillow_bomb_check_is_reported_as_a_bomb():
    # Above Pillow's own 2 x MAX_IMAGE_PIXELS, Pillow refuses in open() already.
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_encoded(_png_claiming(20_000, 20_000), 10**12)


@pytest.mark.parametrize("data, fragment", [
    (b"", "0 bytes"),
    (b"definitely not an image", "not a PNG, JPEG or WebP"),
    (_png_claiming(0, 5), "not a PNG, JPEG or WebP"),
    (_png_claiming(40, 20), "truncated or corrupt"),
])
def test_bad_bytes(data, fragment):
    with pytest.raises(ImageError, match=fragment):
        decode_encoded(data, LIMIT)


def test_truncated_png_and_jpeg(pixels):
    for fmt in ("PNG", "JPEG"):
        data = _encode(np.tile(pixels, (8, 8, 1)), fmt)
        with pytest.raises(ImageError, match="truncated or corrupt"):
            decode_encoded(data[: len(data) // 2], LIMIT)


def test_other_formats_are_refused(pixels):
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(ImageError, match="not a PNG, JPEG or WebP"):
            decode_encoded(_encode(pixels, fmt), LIMIT)


def test_aspect_ratio_limit():
    assert decode_encoded(_encode(np.zeros((1, 200, 3), np.uint8), "PNG"), LIMIT).shape == (1, 200, 3)
    with pytest.raises(ImageError, match="aspect ratio 201x1 exceeds 200:1"):
        decode_encoded(_encode(np.zeros((1, 201, 3), np.uint8), "PNG"), LIMIT)
    with pytest.raises(ImageError, match="aspect ratio 1x201 exceeds 200:1"):
        decode_raw(RawImage(1, 201, bytes(603)), LIMIT)


def test_raw_rgb(pixels):
    raw = RawImage(width=53, height=37, rgb=pixels.tobytes())
    assert np.array_equal(decode_raw(raw, LIMIT), pixels)
    assert np.array_equal(decode_image(raw, LIMIT), pixels)
    with pytest.raises(ImageError, match="needs 5883 RGB bytes, got 5882"):
        decode_raw(RawImage(53, 37, pixels.tobytes()[:-1]), LIMIT)
    with pytest.raises(ImageError, match=r"image is empty \(0x5\)"):
        decode_raw(RawImage(0, 5, b""), LIMIT)
    with pytest.raises(ImageError, match="more than the limit"):
        decode_raw(RawImage(10_000, 10_000, b""), LIMIT)


def test_missing_image():
    with pytest.raises(ImageError, match="no image given"):
        decode_image(None, LIMIT)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_probe_reads_the_header_only():
    assert probe(_png_claiming(40, 20), LIMIT) == (40, 20)  # decoding this would fail: no pixel data
    assert probe(RawImage(3, 2, bytes(18)), LIMIT) == (3, 2)
    with pytest.raises(ImageError, match="raw image of 3x2 needs 18 RGB bytes, got 0"):
        probe(RawImage(3, 2, b""), LIMIT)  # the length too, before any reservation
    with pytest.raises(ImageError, match="more than the limit of 100"):
        probe(_png_claiming(11, 10), 100)
    with pytest.raises(ImageError, match="no image given"):
        probe(None, LIMIT)
    with pytest.raises(ImageError, match="not a PNG, JPEG or WebP"):
        probe(b"GIF89a", LIMIT)


def test_the_641_byte_jpeg_is_refused_as_a_bomb():
    bomb = jpeg_bomb()
    assert len(bomb) == 641 and Image.open(io.BytesIO(bomb)).size == (7071, 7071)  # what Pillow would decode
    message = ("image claims 7071x7071 = 49999041 pixels from 641 bytes, more than 1024 pixels per byte above "
               "16777216 pixels: refused as a decompression bomb")
    for check in (probe, decode_encoded):
        with pytest.raises(ImageError) as info:
            check(bomb, LIMIT)
        assert str(info.value) == message
    with pytest.raises(ImageError, match="refused as a decompression bomb"):
        probe(_png_claiming(7000, 7000), LIMIT)


def test_bomb_rule_boundaries():
    check_not_bomb(4096, 4096, 1)  # up to the floor, any file size
    pixels = 4097 * 4096
    assert pixels > BOMB_FLOOR_PIXELS
    check_not_bomb(4097, 4096, -(-pixels // MAX_PIXELS_PER_BYTE))  # ceil(pixels / 1024) bytes: allowed
    with pytest.raises(ImageError, match="4097x4096 = 16781312 pixels from 16387 bytes"):
        check_not_bomb(4097, 4096, pixels // MAX_PIXELS_PER_BYTE - 1)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_blank_screens_above_the_floor_are_not_bombs(fmt):
    """The most compressible real screenshot: one colour, 20 megapixels, encoded as tightly as
    Pillow can: still far below 1024 pixels per byte."""
    options = {"PNG": {"compress_level": 9}, "JPEG": {"quality": 1}}[fmt]
    data = _encode(np.full((4000, 5000, 3), 255, np.uint8), fmt, **options)
    assert probe(data, LIMIT) == (5000, 4000)
    assert 5000 * 4000 / len(data) < MAX_PIXELS_PER_BYTE / 2


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16"])
def test_strip_conversion_equals_whole_image_conversion(mode, monkeypatch):
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, size=(37, 53, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert(mode) if mode != "P" else rgba.convert("RGB").quantize(16)
    if mode == "P":
        image.info["transparency"] = 3  # palette entry 3 is transparent: composited on white
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    expected = to_rgb_array(Image.open(io.BytesIO(buf.getvalue())))
    monkeypatch.setattr(images, "STRIP_PIXELS", 100)  # 1 row per strip (53 pixels wide rows, 37 strips)
    assert np.array_equal(decode_encoded(buf.getvalue(), LIMIT), expected)
