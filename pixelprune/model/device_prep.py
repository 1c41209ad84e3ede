"""Preprocessing on the device: resize, select and patchify with torch, on any device.

The same results as the numpy/numba core, bit for bit (the tests compare them on
CPU tensors; the arithmetic has no device-specific branch):

- `resize_torch` = `pixelprune.geometry.resize_to` = Pillow's BICUBIC resize
  (`Image.resize`, reducing_gap=None). Pillow resamples with fixed-point integers:
  per output line a first input line and up to `ksize` int32 weights scaled by
  2**22 (`geometry._bicubic_taps` computes them as libImaging/Resample.c does),
  one pass per changed axis, each rounding (+2**21), shifting by 22 and clipping to
  uint8. The order of the passes matters and follows the installed Pillow
  (`_vertical_first`). Here each pass is one gather + int32 multiply-accumulate
  per tap over the whole image (the sums stay below 2**31).
- `kept_pixel_values_torch` = `geometry.kept_pixel_values`: kept blocks gathered
  straight from the resized image, laid out as the processor's rows, normalised
  through the processor's own (3, 256) float32 table (`geometry._lookup_table`,
  exact on any device) cast to the model's dtype (= the CPU rows cast to it).
- `prepare_on_device`: upload the decoded screenshot once, resize, select, gather.
  tau = 0 selects on the device (`select_blocks_torch`, vectorised). tau > 0
  downloads the resized image and runs the CPU numba scan: on an H200 the torch
  scan took 14-78 us/block against ~1.1 us/block for numba. On CUDA all of it
  runs on a stream of the calling thread's own (`_prep_stream`).
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import PIL
import torch

from pixelprune.geometry import (
    BLOCK_SIZE, IMAGE_MEAN, IMAGE_STD, MERGE_SIZE, PATCH_SIZE, ROW_SIZE, TEMPORAL_PATCH_SIZE,
    _bicubic_taps, _lookup_table, check_pixels,
)
from pixelprune.model.selectors_torch import check_image_tensor, select_blocks_torch
from pixelprune.selectors import select_blocks, threshold_units
from pixelprune.settings import PruneSettings
from pixelprune.timings import Timings

_PRECISION_BITS = 22  # Pillow Resample.c: 32 - 8 - 2
_ROUND = 1 << (_PRECISION_BITS - 1)  # added before the shift: round half up
_TAP_CACHE = 64  # (in size, out size) tap tables kept; screenshots repeat a few sizes
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])  # the pass order changed in Pillow 13


@lru_cache(maxsize=_TAP_CACHE)
def _host_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index int64, weight int32), each (ksize, out_size) on the host: input line and
    fixed-point weight of every tap of every output line. Taps past Pillow's count have
    weight 0 and a clamped (valid) index."""
    first, _, fixed = _bicubic_taps(in_size, out_size)
    index = np.minimum(first[:, None] + np.arange(fixed.shape[1]), in_size - 1)
    return torch.from_numpy(np.ascontiguousarray(index.T)), torch.from_numpy(np.ascontiguousarray(fixed.T))


def _taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`_host_taps` on `device`, copied per call (tens of KB): a device copy shared by threads
    on different streams could be freed and reused while another stream still reads it."""
    return tuple(t.to(device) for t in _host_taps(in_size, out_size))


def _resample_axis(src: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """One Pillow 8-bit pass along `axis` (0: vertical, 1: horizontal) of a uint8 (H, W, 3)."""
    index, weight = _taps(int(src.shape[axis]), out_size, src.device)
    shape = [1, 1, 1]
    shape[axis] = out_size
    out_shape = list(src.shape)
    out_shape[axis] = out_size
    acc = torch.full(out_shape, _ROUND, dtype=torch.int32, device=src.device)
    for tap in range(index.shape[0]):  # ksize steps (5 when upscaling), each over the whole image
        acc.addcmul_(src.index_select(axis, index[tap]), weight[tap].view(shape))  # uint8 * int32 -> int32
    return (acc >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _vertical_first(in_h: int, in_w: int, out_h: int, out_w: int, pillow_major: int = _PILLOW_MAJOR) -> bool:
    """Whether Pillow runs the vertical pass before the horizontal one (ImagingResampleInner):
    from Pillow 13 when the height loses more than twice as many pixels as the width (a
    width that grows counts as a negative loss); before 13, never."""
    return pillow_major >= 13 and in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)


def resize_torch(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a uint8 (H, W, 3) tensor to (height, width) on its device, bit-identical to
    `geometry.resize_to` (Pillow's BICUBIC). Returns the input itself when nothing changes."""
    in_h, in_w = check_image_tensor(pixels)
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height} (WxH)")
    passes = [(1, width)] if in_w != width else []  # a pass only for a side that changes
    if in_h != height:
        passes.insert(0 if _vertical_first(in_h, in_w, height, width) else len(passes), (0, height))
    out = pixels
    for axis, size in passes:
        out = _resample_axis(out, axis, size)
    return out


@lru_cache(maxsize=8)
def _host_table(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """(768,) `dtype`: entry c*256 + v = the processor's float32 value of channel c at uint8 v,
    cast to `dtype` (the same rounding as casting the float32 rows). Copied to the device per
    call, like the taps."""
    table, _ = _lookup_table(mean, std)
    return torch.tensor(table.reshape(-1), dtype=torch.float32).to(dtype)


def _check_mean_std(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std must have 3 values (R, G, B)")
    return mean, std


def kept_pixel_values_torch(pixels: torch.Tensor, keep: torch.Tensor | None = None, mean=IMAGE_MEAN,
                            std=IMAGE_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`geometry.kept_pixel_values` on the device: (4*K, 1536) rows of `dtype` on the pixels'
    device for the kept blocks of a resized uint8 (H, W, 3) tensor, block-major in raster
    order, 4 rows per block (sub-patches (0,0), (0,1), (1,0), (1,1)), each row (C=3, T=2,
    16, 16). `keep`: bool (H/32, W/32) tensor on any device (a host mask avoids a device
    sync); None keeps every block."""
    mean, std = _check_mean_std(mean, std)
    height, width = check_image_tensor(pixels)
    if height % BLOCK_SIZE or width % BLOCK_SIZE:
        raise ValueError(f"image sides must be multiples of {BLOCK_SIZE} px, got {width}x{height} (WxH)")
    grid = (height // BLOCK_SIZE, width // BLOCK_SIZE)
    pixels = pixels.contiguous()
    if keep is None:
        keep = torch.ones(grid, dtype=torch.bool)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != grid:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a torch.bool tensor of shape {grid}, got {got}")
    # Kept block coordinates where the mask is (a host mask: no device sync), then to the pixels.
    block_r, block_c = (i.to(pixels.device) for i in torch.nonzero(keep, as_tuple=True))
    count = int(block_r.numel())
    # (rows, 32, cols, 32, 3)[r, :, c] -> (K, 32, 32, 3): the kept blocks only, in raster order.
    kept = pixels.view(grid[0], BLOCK_SIZE, grid[1], BLOCK_SIZE, 3)[block_r, :, block_c]
    # (K, r, ph, c, pw, C) -> (K, r, c, C, ph, pw), as int32 table indices c*256 + v.
    patches = kept.view(count, MERGE_SIZE, PATCH_SIZE, MERGE_SIZE, PATCH_SIZE, 3).permute(0, 1, 3, 5, 2, 4)
    channel = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=pixels.device).view(3, 1, 1)
    index = patches.to(torch.int32, memory_format=torch.contiguous_format) + channel
    values = _host_table(mean, std, dtype).to(pixels.device).index_select(0, index.view(-1))
    values = values.view(count, MERGE_SIZE, MERGE_SIZE, 3, 1, PATCH_SIZE * PATCH_SIZE)
    frames = values.expand(-1, -1, -1, -1, TEMPORAL_PATCH_SIZE, -1)  # both temporal frames
    return frames.reshape(count * MERGE_SIZE * MERGE_SIZE, ROW_SIZE)


@dataclass(frozen=True)
class DevicePrep:
    resized: torch.Tensor | np.ndarray  # uint8 (h, w, 3): on the device, or on the host after a tau > 0 scan
    keep: np.ndarray  # bool (h/32, w/32) on the host: True = block kept
    pixel_values: torch.Tensor  # (4*kept, 1536) rows of the kept blocks on the device, model dtype
    timings: Timings  # seconds of upload, resize, select, patchify


_STREAMS = threading.local()  # .by_device: torch.device -> this thread's preprocessing stream


def _prep_stream(device: torch.device) -> torch.cuda.Stream | None:
    """This thread's own CUDA stream on `device` (None off CUDA). The service prepares in
    request threads while the model worker runs: on a stream of their own, preprocessing
    kernels do not queue behind the model's, and waiting for them (stream.synchronize, at
    each stage for the timings) does not wait for the model."""
    if device.type != "cuda":
        return None
    streams = _STREAMS.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def _sync(stream: torch.cuda.Stream | None) -> None:
    """Wait for the preprocessing stream so that stage timings mean what they say."""
    if stream is not None:
        stream.synchronize()


def _select(resized: torch.Tensor, settings: PruneSettings) -> tuple[np.ndarray, np.ndarray | None]:
    """(host keep mask, host copy of the resized image or None when none was made)."""
    if not settings.enabled:
        grid = (resized.shape[0] // BLOCK_SIZE, resized.shape[1] // BLOCK_SIZE)
        return np.ones(grid, dtype=bool), None
    if threshold_units(settings.method, settings.metric, settings.tau) == 0:
        # Vectorised on the device; only the mask comes back.
        return select_blocks_torch(resized, settings.method, settings.metric, 0.0).cpu().numpy(), None
    # tau > 0: the numba scan on the host beats the torch scan on the device (14-78 vs ~1.1 us/block, H200).
    host = resized.cpu().numpy()
    return select_blocks(host, method=settings.method, metric=settings.metric, tau=settings.tau), host


def prepare_on_device(original: np.ndarray, size: tuple[int, int], settings: PruneSettings,
                      mean=IMAGE_MEAN, std=IMAGE_STD, device="cpu",
                      dtype: torch.dtype = torch.float32) -> DevicePrep:
    """Upload a decoded uint8 (H, W, 3) screenshot, resize it to `size` = (h, w), select and
    patchify on `device` (on CUDA, on this thread's own stream, finished when this returns).
    Stages are timed with a stream sync at each boundary."""
    device = torch.device(device)
    check_pixels(original)
    stream = _prep_stream(device)
    with torch.cuda.stream(stream):  # a no-op with None (off CUDA)
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a read-only array (np.asarray of a PIL image): never written to
            warnings.simplefilter("ignore", UserWarning)
            uploaded = torch.from_numpy(np.ascontiguousarray(original)).to(device)
        _sync(stream)
        t1 = time.perf_counter()
        resized = resize_torch(uploaded, *size)
        _sync(stream)
        t2 = time.perf_counter()
        keep, host = _select(resized, settings)
        t3 = time.perf_counter()
        mask = None if keep.all() else torch.from_numpy(keep)  # on the host: indices are computed there
        pixel_values = kept_pixel_values_torch(resized, mask, mean=mean, std=std, dtype=dtype)
        _sync(stream)
        t4 = time.perf_counter()
    return DevicePrep(resized=resized if host is None else host, keep=keep, pixel_values=pixel_values,
                      timings=Timings(upload=t1 - t0, resize=t2 - t1, select=t3 - t2, patchify=t4 - t3))
