"""Images converted by meaning (16-bit, alpha, palette transparency, CMYK, EXIF orientation), JPEG
scans counted before decoding, decoding stopped for a caller that is gone, raw lengths checked first."""

from __future__ import annotations

import io
import struct

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps

from pixelprune.geometry import to_rgb_array
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.errors import Cancelled
from service.images import MAX_JPEG_SCANS, ImageError, decode_encoded, jpeg_scans, probe
from service_testlib import jpeg_scan_bomb, png16, png_bytes, stub_for

LIMIT = 50_000_000
RNG = np.random.default_rng(5)
PICTURE = RNG.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)  # the 8-bit picture every variant shows


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """What a viewer shows for rgb with alpha over a white page (Pillow's rounding)."""
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))


def test_16_bit_greyscale_is_scaled_not_clipped():
    grey8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.repeat(grey8[:, :, None], 3, axis=2)
    wide = grey8.astype(np.uint16) * 257  # the same picture in 16 bits
    assert np.array_equal(decode_encoded(png16(wide), LIMIT), expected)  # Pillow reads it as I;16
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2")):
        image = Image.frombytes(mode, (16, 16), wide.astype(dtype).tobytes())
        assert np.array_equal(to_rgb_array(image), expected), mode
    assert np.array_equal(to_rgb_array(Image.fromarray(wide.astype(np.int32))), expected)  # mode I
    between = Image.fromarray(np.array([[128, 384, 65535, 0]], np.uint16))  # 128/257 = 0.498 -> 0, 1.49 -> 1
    assert to_rgb_array(between)[0, :, 0].tolist() == [0, 1, 255, 0]


def test_16_bit_greyscale_transparency_is_white():
    grey8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    data = png16(grey8.astype(np.uint16) * 257, trns=struct.pack(">H", 7 * 257))
    expected = np.repeat(grey8[:, :, None], 3, axis=2)
    expected[grey8 == 7] = 255
    assert np.array_equal(decode_encoded(data, LIMIT), expected)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16_bit_colour_and_alpha_pngs_equal_their_8_bit_version(channels):
    eight = RNG.integers(0, 256, size=(12, 9, channels), dtype=np.uint8)
    mode = {2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    expected = decode_encoded(_encode(Image.fromarray(eight, mode), "PNG"), LIMIT)
    assert np.array_equal(decode_encoded(png16(eight.astype(np.uint16) * 257), LIMIT), expected)


def test_alpha_la_and_palette_transparency_are_composited_on_white():
    alpha = RNG.integers(0, 256, size=PICTURE.shape[:2], dtype=np.uint8)
    alpha[0, :4] = (0, 255, 128, 1)
    expected = _on_white(PICTURE, alpha)
    assert expected[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(decode_encoded(_encode(Image.fromarray(np.dstack([PICTURE, alpha]), "RGBA"), "PNG"),
                                         LIMIT), expected)
    grey = PICTURE[:, :, 0]
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    assert np.array_equal(decode_encoded(_encode(la, "PNG"), LIMIT), _on_white(np.dstack([grey] * 3), alpha))
    palette = Image.new("P", (3, 1))
    palette.putpalette([200, 10, 30, 0, 0, 0, 5, 250, 60])
    palette.putdata([0, 1, 2])
    data = _encode(palette, "PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert decode_encoded(data, LIMIT).tolist() == [[[200, 10, 30], [255, 255, 255], [5, 250, 60]]]


def _flat_blocks() -> np.ndarray:
    """A picture of flat 8x8 blocks: JPEG at quality 100 keeps it within a level."""
    return np.repeat(np.repeat(RNG.integers(0, 256, size=(4, 6, 3), dtype=np.uint8), 8, axis=0), 8, axis=1)


def _without_adobe_marker(data: bytes) -> bytes:
    at = data.index(b"\xff\xee")
    return data[:at] + data[at + 2 + int.from_bytes(data[at + 2:at + 4], "big"):]


def test_cmyk_jpegs_show_their_rgb_picture():
    rgb = _flat_blocks()
    cmyk = np.dstack([255 - rgb, np.zeros(rgb.shape[:2], np.uint8)])  # no black ink: C = 255 - R, ...
    adobe = _encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100)  # Pillow writes Adobe's inverted CMYK
    assert b"Adobe" in adobe and Image.open(io.BytesIO(adobe)).info.get("adobe") is not None
    assert np.abs(decode_encoded(adobe, LIMIT).astype(int) - rgb).max() <= 1
    plain = _without_adobe_marker(adobe)  # the same data without the marker: read as inverted, like browsers
    assert b"Adobe" not in plain and Image.open(io.BytesIO(plain)).mode == "CMYK"
    assert np.array_equal(decode_encoded(plain, LIMIT), decode_encoded(adobe, LIMIT))
    black_ink = np.zeros((8, 8, 4), np.uint8)
    black_ink[..., 3] = 200  # K only: grey 55
    grey = decode_encoded(_encode(Image.fromarray(black_ink, "CMYK"), "JPEG", quality=100), LIMIT)
    assert np.abs(grey.astype(int) - 55).max() <= 1


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"lossless": True}), ("JPEG", {"quality": 95})])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_exif_transpose(fmt, options, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(PICTURE), fmt, exif=exif.tobytes(), **options)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(decode_encoded(data, LIMIT), expected)
    assert probe(data, LIMIT) == (expected.shape[1], expected.shape[0])
    assert probe(data, LIMIT) == ((24, 40) if orientation >= 5 else (40, 24))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_ignored():
    data = _encode(Image.fromarray(PICTURE), "PNG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert np.array_equal(decode_encoded(data, LIMIT), PICTURE) and probe(data, LIMIT) == (40, 24)


def test_jpeg_scans_are_counted_from_the_bytes():
    baseline = _encode(Image.fromarray(PICTURE), "JPEG")
    assert jpeg_scans(baseline) == 1
    assert jpeg_scans(_encode(Image.fromarray(PICTURE), "JPEG", progressive=True)) == 10
    assert jpeg_scans(_encode(Image.fromarray(PICTURE[:, :, 0]), "JPEG", progressive=True)) == 6
    thumbnail = b"Exif\x00\x00" + b"\xff\xda\x00\x02" * 100  # an APP1 segment full of SOS-looking bytes
    with_app1 = baseline[:2] + b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 2) + thumbnail + baseline[2:]
    assert jpeg_scans(with_app1, stop_after=1000) == 1
    assert np.array_equal(decode_encoded(with_app1, LIMIT), decode_encoded(baseline, LIMIT))
    assert jpeg_scans(png_bytes(PICTURE)) == 0
    assert jpeg_scans(jpeg_scan_bomb(64, 1000), stop_after=1000) == 1000
    assert jpeg_scans(jpeg_scan_bomb(64, 1000)) == MAX_JPEG_SCANS + 1  # stops counting past the limit


@pytest.mark.parametrize("size", [64, 4096, 7071])
def test_scan_bombs_are_refused_before_decoding_at_every_size(size):
    bomb = jpeg_scan_bomb(size, 1000)
    assert len(bomb) < 300_000
    message = f"JPEG has more than {MAX_JPEG_SCANS} scans: refused"
    with pytest.raises(ImageError, match=message):
        probe(bomb, LIMIT)
    with pytest.raises(ImageError, match=message):
        decode_encoded(bomb, LIMIT)
    allowed = jpeg_scan_bomb(64, MAX_JPEG_SCANS)
    assert probe(allowed, LIMIT) == (64, 64) and decode_encoded(allowed, LIMIT).shape == (64, 64, 3)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("JPEG", {"quality": 95}),
                                          ("JPEG", {"quality": 95, "progressive": True})])
def test_decoding_stops_once_the_caller_is_gone(fmt, options):
    """is_active() is asked before each 64 KiB Pillow reads: False after 3 questions stops the
    decoding at the next read; the whole image would have taken many more."""
    noise = RNG.integers(0, 256, size=(1024, 1024, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt, **options)
    asked = []

    def is_active():
        asked.append(1)
        return len(asked) <= 3

    with pytest.raises(Cancelled, match="went away"):
        decode_encoded(data, LIMIT, is_active)
    assert len(asked) == 4
    counted = []
    assert decode_encoded(data, LIMIT, lambda: counted.append(1) or True).shape == (1024, 1024, 3)
    assert len(counted) > 10


def test_a_wrong_raw_length_is_invalid_even_when_the_budget_is_full(make_server, channels):
    handle, _ = make_server(max_image_pixels=1_000_000, max_inflight_pixels=1_000_000)
    handle.admission.budget.acquire(1_000_000)  # no room for anything
    stub = stub_for(channels(handle.port))
    request = pb.GroundRequest(image=pb.Image(raw=pb.RawImage(width=64, height=64, rgb=bytes(100))), instruction="x")
    with pytest.raises(grpc.RpcError) as info:
        stub.Ground(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "raw image of 64x64 needs 12288 RGB bytes, got 100"
    handle.admission.budget.release(1_000_000)


def test_the_service_sees_16_bit_and_rotated_screens_as_a_viewer_does(make_server, channels):
    """Through a real server: a 16-bit PNG prunes exactly like its 8-bit version (same kept blocks);
    an EXIF-rotated JPEG is answered in the rotated picture's pixels."""
    handle, _ = make_server()
    stub = stub_for(channels(handle.port))
    screen = np.full((320, 480), 250, np.uint8)  # a light page with a few dark bars
    screen[40:72, 64:320] = 20
    screen[160:200, 96:448] = 90
    eight = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=png_bytes(screen)), instruction="x"), timeout=60)
    wide = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=png16(screen.astype(np.uint16) * 257)),
                                        instruction="x"), timeout=60)
    assert (wide.kept_blocks, wide.total_blocks) == (eight.kept_blocks, eight.total_blocks)
    assert wide.keep_mask.bits == eight.keep_mask.bits and wide.retain_ratio < 0.5
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    rotated = _encode(Image.fromarray(screen), "JPEG", exif=exif.tobytes())
    answer = stub.Ground(pb.GroundRequest(image=pb.Image(encoded=rotated), instruction="x"), timeout=60)
    assert (answer.image_width, answer.image_height) == (320, 480)
    if answer.found:
        assert 0 <= answer.point.x <= 320 and 0 <= answer.point.y <= 480


def test_the_proto_states_the_scan_limit_and_exif_behaviour():
    from pathlib import Path

    proto = (Path(__file__).resolve().parents[2] / "proto/pixelprune/grounding/v1/grounding.proto").read_text()
    assert f"A JPEG of more than {MAX_JPEG_SCANS} scans" in proto and "EXIF orientation" in proto
