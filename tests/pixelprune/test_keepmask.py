"""The keep mask's wire form: exact bits, round trips of every size, bad input as ValueError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pixelprune.keepmask import pack_keep, packed_length, unpack_keep


def test_exact_bits_msb_first_row_major_zero_padded():
    keep = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=bool)
    # bits 101 110 001, then 7 zero bits: 1011 1000, 1000 0000
    assert pack_keep(keep) == (3, 3, b"\xb8\x80")
    assert np.array_equal(unpack_keep(3, 3, b"\xb8\x80"), keep)


@pytest.mark.parametrize("rows, cols, expected", [
    (1, 1, b"\x80"), (1, 8, b"\xff"), (2, 4, b"\xff"), (3, 5, b"\xff\xfe"), (1, 9, b"\xff\x80"),
])
def test_all_kept_of_odd_sizes(rows, cols, expected):
    assert pack_keep(np.ones((rows, cols), dtype=bool)) == (rows, cols, expected)
    assert packed_length(rows, cols) == len(expected)


def test_a_1080p_grid():
    # 1920x1080 -> smart_resize 1920x1088 -> 34 x 60 blocks = 2040 bits = 255 bytes
    keep = np.zeros((34, 60), dtype=bool)
    keep[0, 0] = keep[-1, -1] = True
    rows, cols, bits = pack_keep(keep)
    assert (rows, cols, len(bits)) == (34, 60, 255)
    assert bits[0] == 0x80 and bits[-1] == 0x01 and not any(bits[1:-1])


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)))
def test_round_trip(keep):
    rows, cols, bits = pack_keep(keep)
    assert (rows, cols) == keep.shape and len(bits) == packed_length(rows, cols)
    back = unpack_keep(rows, cols, bits)
    assert back.dtype == np.bool_ and np.array_equal(back, keep)


def test_non_contiguous_masks_pack_by_their_logical_order():
    keep = np.array([[1, 0], [0, 0], [1, 1]], dtype=bool).T  # the (2, 3) view [[1, 0, 1], [0, 0, 1]]
    rows, cols, bits = pack_keep(keep)
    assert (rows, cols, bits) == (2, 3, bytes([0b10100100]))


@pytest.mark.parametrize("mask, message", [
    (np.ones((2, 2), dtype=np.uint8), "2-D bool array, got uint8"),
    (np.ones(4, dtype=bool), "2-D bool array, got bool (4,)"),
    (np.ones((2, 2, 1), dtype=bool), "2-D bool array"),
    (np.ones((0, 3), dtype=bool), "non-empty"),
    ([[True]], "got list"),
])
def test_pack_rejects(mask, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pack_keep(mask)


@pytest.mark.parametrize("rows, cols, bits, message", [
    (3, 3, b"\xb8", "takes 2 bytes, got 1"),
    (3, 3, b"\xb8\x80\x00", "takes 2 bytes, got 3"),
    (3, 3, b"\xb8\x81", "padding bits are not zero"),
    (0, 3, b"", "must be positive"),
    (3, -1, b"", "must be positive"),
    (2.0, 3, b"\x00", "must be integers"),
    (True, 1, b"\x80", "must be integers"),
    (1, 1, "\x80", "must be bytes, got str"),
])
def test_unpack_rejects(rows, cols, bits, message):
    with pytest.raises(ValueError, match=message):
        unpack_keep(rows, cols, bits)
