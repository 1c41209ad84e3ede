"""Frames on the wire: any accepted image input -> the proto's `Image` (encoded bytes or raw RGB).

Images may be a path, file bytes, a PIL image or a uint8 (H, W, 3) RGB array.
PNG / JPEG / WebP bytes (from a path or given as bytes) are sent as they are:
the server decodes them. Pixels (arrays, PIL images, other file formats) are
PNG-encoded with zlib level 1, the fastest level that still compresses
screenshots ~20x (a 1080p desktop: 6.2 MB raw -> 0.31 MB in ~45 ms on one Xeon
core; level 6 saves 6% more for 40% more time). The raw RGB form of the proto is
used instead when it is smaller (noise-like images) or when it is the only one
that fits the message limit, or always with `frame_encoding="raw"` (no encoding
cost; worth it on loopback). Every failure is a one-line ValueError.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixelprune.geometry import to_rgb_array
from pixelprune_api.grounding.v1 import grounding_pb2 as pb

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # send/receive limit; a raw 4K frame is 24 MiB
MESSAGE_OVERHEAD_BYTES = 16 * 1024  # instruction, session id, settings and framing beside the image
PNG_COMPRESS_LEVEL = 1  # zlib level for frames encoded here: fastest that still compresses
FRAME_ENCODINGS = ("png", "raw")

ImageInput = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def is_encoded_image(data: bytes) -> bool:
    """True for PNG, JPEG or WebP file bytes (by magic number): the formats the server decodes."""
    return (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def check_frame_encoding(frame_encoding: str) -> None:
    if frame_encoding not in FRAME_ENCODINGS:
        raise ValueError(f"frame_encoding must be one of {FRAME_ENCODINGS}, got {frame_encoding!r}")


def encode_pixels(pixels: np.ndarray, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  frame_encoding: str = "png") -> pb.Image:
    """A uint8 (H, W, 3) RGB array as a proto Image: PNG (level 1) or raw, whichever is
    preferred and fits the message limit (see the module docstring)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 \
            or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise ValueError(f"image array must be uint8 (H, W, 3) RGB with H, W > 0, got {dtype} {shape}")
    check_frame_encoding(frame_encoding)
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    limit = max_message_bytes - MESSAGE_OVERHEAD_BYTES
    raw = lambda: pb.Image(raw=pb.RawImage(width=width, height=height, rgb=pixels.tobytes()))  # noqa: E731
    if frame_encoding == "raw" and pixels.nbytes <= limit:
        return raw()
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    png = buf.getvalue()
    smallest = min(len(png), pixels.nbytes)
    if smallest > limit:
        raise ValueError(f"a {width}x{height} image is {smallest} bytes even as PNG, over the message limit "
                         f"of {max_message_bytes} bytes: raise max_message_bytes (and the server's "
                         "--max-message-bytes) or send a smaller image")
    return pb.Image(encoded=png) if len(png) <= pixels.nbytes else raw()


def encode_image(image: ImageInput, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 frame_encoding: str = "png") -> pb.Image:
    """Any accepted image input as a proto Image. PNG/JPEG/WebP bytes go as they are."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        data = path.read_bytes()
        if is_encoded_image(data):
            return _checked_encoded(data, max_message_bytes)
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels = to_rgb_array(im)
        except UnidentifiedImageError:  # its message would name the BytesIO object
            raise ValueError(f"{path}: not an image file (PNG, JPEG, WebP or another format Pillow reads)") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{path}: not an image file Pillow can read ({exc})") from None
        return encode_pixels(pixels, max_message_bytes, frame_encoding)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not is_encoded_image(data):
            raise ValueError("image bytes are not PNG, JPEG or WebP; pass raw pixels as a uint8 (H, W, 3) array")
        return _checked_encoded(data, max_message_bytes)
    if isinstance(image, Image.Image):
        return encode_pixels(to_rgb_array(image), max_message_bytes, frame_encoding)
    if isinstance(image, np.ndarray):
        return encode_pixels(image, max_message_bytes, frame_encoding)
    raise ValueError(f"unsupported image input {type(image).__name__}: "
                     "use a path, PNG/JPEG/WebP bytes, a PIL image or a uint8 (H, W, 3) array")


def _checked_encoded(data: bytes, max_message_bytes: int) -> pb.Image:
    if len(data) > max_message_bytes - MESSAGE_OVERHEAD_BYTES:
        raise ValueError(f"image file is {len(data)} bytes, over the message limit of {max_message_bytes} "
                         "bytes: raise max_message_bytes (and the server's --max-message-bytes)")
    return pb.Image(encoded=data)
