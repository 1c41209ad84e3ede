"""agent_client.frames: image inputs -> the proto's Image (PNG level 1 or raw), no server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from agent_client.frames import MESSAGE_OVERHEAD_BYTES, encode_image, encode_pixels
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.images import decode_encoded


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def decoded(image: pb.Image) -> np.ndarray:
    if image.WhichOneof("source") == "raw":
        return np.frombuffer(image.raw.rgb, np.uint8).reshape(image.raw.height, image.raw.width, 3)
    with Image.open(io.BytesIO(image.encoded)) as im:
        return np.asarray(im.convert("RGB"))


def test_encoded_files_go_as_they_are(tmp_path, screenshot):
    data = png_bytes(screenshot)
    path = tmp_path / "shot.png"
    path.write_bytes(data)
    assert encode_image(path).encoded == data
    assert encode_image(str(path)).encoded == data
    assert encode_image(data).encoded == data
    jpeg = io.BytesIO()
    Image.fromarray(screenshot).save(jpeg, format="JPEG")
    assert encode_image(jpeg.getvalue()).encoded == jpeg.getvalue()


def test_pixels_are_png_encoded_losslessly(tmp_path, screenshot):
    image = encode_image(screenshot)
    assert image.encoded.startswith(b"\x89PNG") and len(image.encoded) < screenshot.nbytes / 4
    assert np.array_equal(decoded(image), screenshot)
    assert np.array_equal(decoded(encode_image(Image.fromarray(screenshot))), screenshot)
    bmp = tmp_path / "shot.bmp"  # not a format the server takes: decoded here and re-encoded
    Image.fromarray(screenshot).save(bmp)
    assert np.array_equal(decoded(encode_image(bmp)), screenshot)
    # Transparency: the client converts as the server does with the same image sent as a PNG
    # file (alpha composited on white), so the model sees the same pixels either way.
    rgba = Image.fromarray(np.dstack([screenshot, np.full(screenshot.shape[:2], 7, np.uint8)]), "RGBA")
    as_file = io.BytesIO()
    rgba.save(as_file, format="PNG")
    server_side = decode_encoded(as_file.getvalue(), max_pixels=10**8)
    assert np.array_equal(decoded(encode_image(rgba)), server_side)
    assert server_side.min() >= 240  # 7/255 opaque: nearly the white background


def test_noise_goes_raw_because_png_would_be_larger():
    noise = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    image = encode_pixels(noise)
    assert image.WhichOneof("source") == "raw"
    assert (image.raw.width, image.raw.height) == (96, 64)
    assert np.array_equal(decoded(image), noise)
    view = noise[:, ::2]  # non-contiguous input
    assert np.array_equal(decoded(encode_pixels(view)), view)


def test_raw_on_request_and_the_message_limit(screenshot):
    assert encode_pixels(screenshot, frame_encoding="raw").WhichOneof("source") == "raw"
    png_size = len(encode_pixels(screenshot).encoded)
    # raw does not fit, PNG does: PNG even when raw was asked for
    limit = MESSAGE_OVERHEAD_BYTES + png_size + 10
    assert encode_pixels(screenshot, limit, frame_encoding="raw").WhichOneof("source") == "encoded"
    with pytest.raises(ValueError, match="over the message limit"):
        encode_pixels(screenshot, MESSAGE_OVERHEAD_BYTES + png_size - 1)
    with pytest.raises(ValueError, match="over the message limit"):
        encode_image(png_bytes(screenshot), MESSAGE_OVERHEAD_BYTES + 100)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8), 42])
def test_bad_images_are_value_errors(bad):
    with pytest.raises(ValueError):
        encode_image(bad)


def test_bytes_that_are_not_an_image(tmp_path):
    with pytest.raises(ValueError, match="not PNG, JPEG or WebP"):
        encode_image(b"GIF89a....")
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not an image file"):
        encode_image(path)
    with pytest.raises(FileNotFoundError):
        encode_image(tmp_path / "missing.png")
