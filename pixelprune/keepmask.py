"""The keep mask on the wire: one bit per 32x32 block, row-major, most significant bit first.

    rows, cols, bits = pack_keep(keep)        # keep: bool (rows, cols)
    keep = unpack_keep(rows, cols, bits)      # the same array back

This is the layout of the proto's `KeepMask` (numpy.packbits / numpy.unpackbits with
bitorder="big", the last byte padded with zero bits). The server packs the blocks
the model saw, the client unpacks them; both use this pair, which checks its input
so that a damaged mask is a ValueError and never a wrong picture.
"""

from __future__ import annotations

import numpy as np


def packed_length(rows: int, cols: int) -> int:
    """Bytes of a packed (rows, cols) mask: ceil(rows * cols / 8)."""
    return (rows * cols + 7) // 8


def pack_keep(mask: np.ndarray) -> tuple[int, int, bytes]:
    """A bool (rows, cols) mask (rows, cols >= 1) -> (rows, cols, packed bits)."""
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2 or 0 in mask.shape:
        shape = getattr(mask, "shape", None)
        dtype = getattr(mask, "dtype", type(mask).__name__)
        raise ValueError(f"keep mask must be a non-empty 2-D bool array, got {dtype} {shape}")
    rows, cols = mask.shape
    return int(rows), int(cols), np.packbits(mask, axis=None, bitorder="big").tobytes()


def unpack_keep(rows: int, cols: int, bits: bytes) -> np.ndarray:
    """Inverse of pack_keep: a bool (rows, cols) array. ValueError for a shape that is not
    positive, bits of the wrong length, or padding bits that are not zero."""
    if isinstance(rows, bool) or isinstance(cols, bool) or not (isinstance(rows, (int, np.integer))
                                                                and isinstance(cols, (int, np.integer))):
        raise ValueError(f"keep mask rows and cols must be integers, got {rows!r} and {cols!r}")
    if rows < 1 or cols < 1:
        raise ValueError(f"keep mask shape must be positive, got {rows}x{cols}")
    if not isinstance(bits, (bytes, bytearray, memoryview)):
        raise ValueError(f"keep mask bits must be bytes, got {type(bits).__name__}")
    data = np.frombuffer(bits, dtype=np.uint8)
    expected = packed_length(int(rows), int(cols))
    if data.size != expected:
        raise ValueError(f"a {rows}x{cols} keep mask takes {expected} bytes, got {data.size}")
    flat = np.unpackbits(data, bitorder="big")
    size = int(rows) * int(cols)
    if flat[size:].any():
        raise ValueError("keep mask padding bits are not zero")
    return flat[:size].astype(bool).reshape(int(rows), int(cols))
