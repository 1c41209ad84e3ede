"""Qwen3-VL image geometry: resize, blocks, patch rows and coordinates.

Everything here reproduces what transformers' `Qwen2VLImageProcessorPil`
(configured as Qwen3-VL: patch 16, merge 2, temporal patch 2, mean = std = 0.5,
pixels clamped to [256*256, 4096*4096]) does to an image, but without importing
transformers, and split so that pruning can run on the resized uint8 pixels and
only the kept blocks are normalised and patchified.

Vocabulary: *patch* = 16x16 ViT patch; *block* = 2x2 patches = 32x32 px = one
visual (LLM) token.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image

from pixelprune._jit import Kernels

PATCH_SIZE = 16  # ViT patch edge, px
MERGE_SIZE = 2  # patches merged per side into one LLM token
BLOCK_SIZE = PATCH_SIZE * MERGE_SIZE  # 32 px: one block = one visual token
TEMPORAL_PATCH_SIZE = 2  # a still image is fed as two identical frames
MIN_PIXELS = 65536  # 256*256: Qwen3-VL preprocessor_config "shortest_edge"
MAX_PIXELS = 16777216  # 4096*4096: Qwen3-VL preprocessor_config "longest_edge"
MAX_ASPECT_RATIO = 200  # smart_resize rejects images more elongated than 200:1
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
ROW_SIZE = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1536 floats per pixel_values row
_CHUNK_BLOCKS = 64  # blocks normalised at a time in kept_pixel_values
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's 16/32-bit greyscale modes


def smart_resize(height: int, width: int, factor: int = BLOCK_SIZE,
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width) of Qwen-VL's `smart_resize`: multiples of `factor`,
    total pixels within [min_pixels, max_pixels], aspect ratio kept as well as
    possible. Rounding is Python's `round` (half to even), as upstream."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height} (WxH)")
    if factor <= 0 or min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(f"bad resize limits: factor={factor}, min_pixels={min_pixels}, max_pixels={max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
                         f"{MAX_ASPECT_RATIO}:1 ({width}x{height} WxH)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb_array(image) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image or from a uint8 (H, W, 3) array: the picture a viewer
    shows, converted by meaning, never by clipping. The one conversion the library, the service
    and the client share, so a screenshot gives the same pixels whichever way it travels.

    16-bit greyscale (I;16, I;16L, I;16B, I;16N, and I, which holds 16-bit PNGs in some Pillow
    versions) is scaled to 8 bits (v * 255 / 65535, rounded); Pillow reads 16-bit RGB, RGBA and LA
    PNGs as their high bytes. Alpha (RGBA, LA, PA, a palette or grey value marked transparent) is
    composited on white, like the processor's convert_to_rgb. CMYK becomes (255 - C)(255 - K) / 255
    per channel (Pillow's conversion; Pillow reads CMYK JPEGs as Adobe's inverted CMYK, with or
    without the Adobe marker, as browsers do). EXIF orientation is not applied here: it belongs to
    the file (service/images.py)."""
    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return np.asarray(image)  # no convert(): it would copy the pixels once more
        if image.mode in _WIDE_GREY_MODES:
            return _wide_grey_to_rgb(image)
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image.convert("RGB"))
    return check_pixels(image)


def _wide_grey_to_rgb(image) -> np.ndarray:
    """16-bit (or 32-bit integer, read as 16-bit) greyscale -> uint8 (H, W, 3), scaled with
    rounding; the grey value a tRNS chunk marks transparent becomes white (composited on white)."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        grey[values == transparent] = 255
    return np.repeat(grey[:, :, None], 3, axis=2)


def check_pixels(pixels) -> np.ndarray:
    """Validate a uint8 (H, W, 3) numpy image; returns it unchanged."""
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"expected a numpy uint8 (H, W, 3) array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected dtype uint8, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected shape (H, W, 3), got {pixels.shape}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"image is empty: shape {pixels.shape}")
    return pixels


def check_block_pixels(pixels) -> np.ndarray:
    """Validate a uint8 (H, W, 3) image whose sides are multiples of BLOCK_SIZE."""
    check_pixels(pixels)
    height, width = pixels.shape[:2]
    if height % BLOCK_SIZE or width % BLOCK_SIZE:
        raise ValueError(f"image sides must be multiples of {BLOCK_SIZE} px, got {width}x{height} (WxH); "
                         "resize with smart_resize/resize_to first")
    return pixels


def resize_to(image, height: int, width: int) -> np.ndarray:
    """Resize to (height, width) exactly as `Qwen2VLImageProcessorPil` does: PIL
    bicubic on the uint8 RGB image (no reducing_gap). Returns uint8 (height, width, 3);
    the input array itself (no copy) when it already has that size.

    When only one side changes (the common screenshot case: 1080 -> 1088,
    2160 -> 2176) and numba is installed, Pillow's own fixed-point pass for that
    side runs as a compiled loop straight on the RGB array: several times faster
    and bit-identical (the tests compare it with Pillow on many sizes). When both
    sides change Pillow picks the order of its two passes itself, so Pillow runs."""
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height} (WxH)")
    pixels = to_rgb_array(image)
    if pixels.shape[:2] == (height, width):
        return pixels
    one_side = pixels.shape[0] == height or pixels.shape[1] == width
    if one_side and _kernels() is not None:
        return _resize_one_side(pixels, height, width)
    resized = Image.fromarray(np.ascontiguousarray(pixels)).resize(
        (width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized)


_PRECISION_BITS = 22  # Pillow Resample.c: 32 - 8 - 2


def _bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for BICUBIC (a = -0.5),
    same double-precision steps in the same order: per output line the first input
    line, the tap count and the int32 fixed-point weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    x = np.abs(((np.arange(ksize)[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    weights = np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
    weights[np.arange(ksize)[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for tap in range(ksize):  # sequential, as the C loop adds them
        total = total + weights[:, tap]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return first, count, fixed


def _clip8(value):
    return 0 if value < 0 else (255 if value > 255 else value)


def _horizontal_pass(src, out, first, count, fixed):
    """Pillow's ImagingResampleHorizontal_8bpc on (H, W, 3) uint8 images."""
    for y in range(src.shape[0]):
        for xx in range(out.shape[1]):
            s0 = s1 = s2 = np.int32(1 << 21)
            for tap in range(count[xx]):
                weight, x = fixed[xx, tap], first[xx] + tap
                s0 += np.int32(src[y, x, 0]) * weight
                s1 += np.int32(src[y, x, 1]) * weight
                s2 += np.int32(src[y, x, 2]) * weight
            out[y, xx, 0] = _clip8(s0 >> 22)
            out[y, xx, 1] = _clip8(s1 >> 22)
            out[y, xx, 2] = _clip8(s2 >> 22)


def _vertical_pass(src, out, first, count, fixed):
    """Pillow's ImagingResampleVertical_8bpc on (H, W*3) uint8 rows."""
    acc = np.empty(src.shape[1], dtype=np.int32)
    for yy in range(out.shape[0]):
        acc[:] = 1 << 21
        for tap in range(count[yy]):
            weight = fixed[yy, tap]
            row = src[first[yy] + tap]
            for x in range(acc.shape[0]):
                acc[x] += np.int32(row[x]) * weight
        for x in range(acc.shape[0]):
            out[yy, x] = _clip8(acc[x] >> 22)


_KERNELS = Kernels(globals(), {"horizontal": "_horizontal_pass", "vertical": "_vertical_pass"},
                   helpers=("_clip8",))


def _kernels():
    """The compiled passes (compiled once, on first use), or None without numba."""
    return _KERNELS.load()


def _resize_one_side(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's bicubic resample when only the width or only the height changes."""
    pixels = np.ascontiguousarray(pixels)
    in_height, in_width = pixels.shape[:2]
    if in_width != width:
        out = np.empty((in_height, width, 3), dtype=np.uint8)
        _KERNELS["horizontal"](pixels, out, *_bicubic_taps(in_width, width))
        return out
    out = np.empty((height, width * 3), dtype=np.uint8)
    _KERNELS["vertical"](pixels.reshape(in_height, -1), out, *_bicubic_taps(in_height, height))
    return out.reshape(height, width, 3)


def block_view(pixels: np.ndarray) -> np.ndarray:
    """Zero-copy (H/32, W/32, 32, 32, 3) view of a (H, W, 3) image: [r, c] is block (r, c)."""
    check_block_pixels(pixels)
    height, width = pixels.shape[:2]
    s0, s1, s2 = pixels.strides
    return np.lib.stride_tricks.as_strided(
        pixels, shape=(height // BLOCK_SIZE, width // BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE, 3),
        strides=(s0 * BLOCK_SIZE, s1 * BLOCK_SIZE, s0, s1, s2), writeable=False)


def image_grid_thw(height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of a resized still image, as the processor reports it."""
    if height <= 0 or width <= 0 or height % BLOCK_SIZE or width % BLOCK_SIZE:
        raise ValueError(f"resized sides must be positive multiples of {BLOCK_SIZE}, got {width}x{height} (WxH)")
    return (1, height // PATCH_SIZE, width // PATCH_SIZE)


@lru_cache(maxsize=8)
def _lookup_table(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, bool]:
    """(3, 256) float32 table: value v of channel c -> the processor's normalised
    float, plus whether plain float32 arithmetic reproduces it bit for bit.

    The processor rescales as float64 `v * (1/255)` cast to float32, then
    normalises in float32 `(x - mean) / std`; the table repeats those exact steps.
    `_normalise` computes `v / 255` directly in float32 (faster than a gather);
    since it is elementwise IEEE arithmetic, equality on all 256 inputs here
    proves equality on any image, otherwise the table is used."""
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (scaled[None, :] - mean32) / std32
    table.setflags(write=False)
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    return table, bool(np.array_equal(_arithmetic(values, mean, std), table))


def _arithmetic(values: np.ndarray, mean, std) -> np.ndarray:
    """float32 `(v / 255 - mean) / std` with the channel on axis -2."""
    out = values.astype(np.float32)
    out /= np.float32(255)
    out -= np.asarray(mean, dtype=np.float32)[:, None]
    out /= np.asarray(std, dtype=np.float32)[:, None]
    return out


def _normalise(values: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (..., 3, N) -> float32 (..., 3, N), bit-identical to the processor."""
    table, arithmetic_ok = _lookup_table(mean, std)
    if arithmetic_ok:
        return _arithmetic(values, mean, std)
    return table[np.arange(3)[:, None], values]


def _check_keep(keep, grid_shape: tuple[int, int]) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.shape != grid_shape:
        raise ValueError(f"keep must be a bool array of shape {grid_shape}, got {keep.dtype} {keep.shape}")
    return keep


def kept_pixel_values(pixels: np.ndarray, keep=None, mean=IMAGE_MEAN, std=IMAGE_STD) -> np.ndarray:
    """The processor's `pixel_values` rows of the kept blocks only: float32
    (4*K, 1536), block-major in raster order of the kept blocks, 4 rows per block
    (sub-patches (0,0), (0,1), (1,0), (1,1)), each row (C=3, T=2, 16, 16) with the
    temporal copy duplicated. `keep=None` keeps every block (= the full rows).

    Only kept blocks are touched: their uint8 pixels are gathered and rearranged,
    then normalised with float32 arithmetic that `_lookup_table` has checked
    against the processor's computation for all 256 values (or through that
    table), so the values are bit-identical to the processor's."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std must have 3 values (R, G, B)")
    blocks = block_view(pixels)
    if keep is None:
        kept = blocks.reshape(-1, BLOCK_SIZE, BLOCK_SIZE, 3)
    else:
        kept = blocks[_check_keep(keep, blocks.shape[:2])]
    count = kept.shape[0]
    # (K, r, ph, c, pw, C) -> (K, r, c, C, ph, pw): a view; copied chunk by chunk below.
    patches = kept.reshape(count, MERGE_SIZE, PATCH_SIZE, MERGE_SIZE, PATCH_SIZE, 3).transpose(0, 1, 3, 5, 2, 4)
    out = np.empty((count, MERGE_SIZE, MERGE_SIZE, 3, TEMPORAL_PATCH_SIZE, PATCH_SIZE * PATCH_SIZE),
                   dtype=np.float32)
    for start in range(0, count, _CHUNK_BLOCKS):  # small chunks: the float scratch stays in cache
        chunk = patches[start:start + _CHUNK_BLOCKS]
        flat = chunk.reshape(chunk.shape[0], MERGE_SIZE, MERGE_SIZE, 3, PATCH_SIZE * PATCH_SIZE)
        values = _normalise(flat, mean, std)
        out[start:start + _CHUNK_BLOCKS] = values[:, :, :, :, None, :]  # both temporal frames
    return out.reshape(count * MERGE_SIZE * MERGE_SIZE, ROW_SIZE)


def kept_patch_rows(keep) -> np.ndarray:
    """int64 indices of the kept blocks' rows in the full `pixel_values`
    (block k of the raster order owns rows 4k .. 4k+3)."""
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.ndim != 2:
        raise ValueError(f"keep must be a 2-D bool array, got {keep.dtype} with shape {keep.shape}")
    blocks = np.flatnonzero(keep).astype(np.int64)
    per_block = MERGE_SIZE * MERGE_SIZE
    return (blocks[:, None] * per_block + np.arange(per_block, dtype=np.int64)).reshape(-1)


def _scale(x: float, y: float, src_size, dst_size) -> tuple[float, float]:
    (src_w, src_h), (dst_w, dst_h) = src_size, dst_size
    if min(src_w, src_h, dst_w, dst_h) <= 0:
        raise ValueError(f"sizes must be positive, got {tuple(src_size)} and {tuple(dst_size)}")
    return float(x) * dst_w / src_w, float(y) * dst_h / src_h


def to_original(x: float, y: float, original_size, resized_size) -> tuple[float, float]:
    """Map a point (continuous pixel coordinates, origin at the top-left corner)
    on the resized image back to the original screenshot. Sizes are (W, H)."""
    return _scale(x, y, resized_size, original_size)


def to_resized(x: float, y: float, original_size, resized_size) -> tuple[float, float]:
    """Map a point on the original screenshot onto the resized image. Sizes are (W, H)."""
    return _scale(x, y, original_size, resized_size)
