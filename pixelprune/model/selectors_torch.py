"""The selectors of `pixelprune.selectors` for torch uint8 tensors, on any device.

Same rule, same masks (tests compare them with the numpy version): tau = 0 is
vectorised over the whole image (blocks compared as int64 words); tau > 0 tracks
the decoder's reconstruction (Proposition 2) as a source index per block, one
anti-diagonal per step for pred2d (every block on a diagonal depends only on
earlier diagonals), and in growing vectorised runs after each anchor for the
1-D scans. No host round trip per block.

On CUDA, `pipeline.prepare_image` runs the tau = 0 path on the GPU (through
`device_prep`). The tau > 0 scans run there too but measured slower than the
numba scan on the host (H200: 14 us/block pred2d, 78 us/block raster/serpentine,
against ~1.1 us/block), so tau > 0 selects on the CPU.
"""

from __future__ import annotations

import torch

from pixelprune.geometry import BLOCK_SIZE
from pixelprune.selectors import diagonal_table, scan_order, threshold_units

_ROW_BYTES = BLOCK_SIZE * 3  # 96 bytes: one pixel row of one block
_ROW_WORDS = _ROW_BYTES // 8  # 12 int64 words


def check_image_tensor(pixels) -> tuple[int, int]:
    """(H, W) of a non-empty uint8 (H, W, 3) torch tensor; ValueError for anything else."""
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"expected a torch uint8 (H, W, 3) tensor, got {type(pixels).__name__}")
    if pixels.dtype != torch.uint8:
        raise ValueError(f"expected dtype torch.uint8, got {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"expected a non-empty (H, W, 3) tensor, got shape {tuple(pixels.shape)}")
    return int(pixels.shape[0]), int(pixels.shape[1])


def _check(pixels) -> tuple[int, int]:
    height, width = check_image_tensor(pixels)
    if height % BLOCK_SIZE or width % BLOCK_SIZE:
        raise ValueError(f"image sides must be multiples of {BLOCK_SIZE} px, got {width}x{height} (WxH)")
    return height // BLOCK_SIZE, width // BLOCK_SIZE


def select_blocks_torch(pixels: torch.Tensor, method: str = "pred2d", metric: str = "max",
                        tau: float = 0.0) -> torch.Tensor:
    """Keep mask, torch.bool (H/32, W/32) on the input's device, of a uint8
    (H, W, 3) tensor; equal to `select_blocks` on the same pixels."""
    thr = threshold_units(method, metric, tau)
    rows, cols = _check(pixels)
    if rows * cols == 1:
        return torch.ones((1, 1), dtype=torch.bool, device=pixels.device)
    pixels = pixels.contiguous()
    if pixels.storage_offset() % 8:  # a view at an odd byte offset cannot be read as int64 words
        pixels = pixels.clone()
    if thr == 0:
        return _exact_mask(pixels, method, rows, cols)
    blocks = pixels.view(rows, BLOCK_SIZE, cols, _ROW_BYTES).permute(0, 2, 1, 3)
    similar = _PairTest(blocks.reshape(rows * cols, -1), metric == "max", thr)
    if method == "pred2d":
        keep = _wavefront_pred2d(similar, rows, cols)
    else:
        order = torch.from_numpy(scan_order(method, rows, cols)).to(pixels.device)
        keep = _anchor_scan(similar, order)
    return keep.view(rows, cols)


def _exact_mask(pixels: torch.Tensor, method: str, rows: int, cols: int) -> torch.Tensor:
    """Vectorised exact selection from the equalities of adjacent blocks."""
    height = rows * BLOCK_SIZE
    words = pixels.view(height, cols * _ROW_BYTES).view(torch.int64)
    differ = words[:, _ROW_WORDS:] != words[:, :-_ROW_WORDS]
    differ = differ.reshape(rows, BLOCK_SIZE, (cols - 1) * _ROW_WORDS).any(dim=1)
    right = ~differ.view(rows, cols - 1, _ROW_WORDS).any(dim=-1)  # (r, c) == (r, c+1)
    bands = words.reshape(rows, -1)
    differ = (bands[1:] != bands[:-1]).reshape(rows - 1, BLOCK_SIZE, cols * _ROW_WORDS).any(dim=1)
    down = ~differ.view(rows - 1, cols, _ROW_WORDS).any(dim=-1)  # (r, c) == (r+1, c)
    keep = torch.zeros((rows, cols), dtype=torch.bool, device=pixels.device)
    if method == "pred2d":
        keep[0, 1:] = ~right[0]
        keep[1:, 0] = ~down[:, 0]
        use_b = down[:, :-1] & ~right[:-1]  # similar(C, A) and not similar(C, B)
        keep[1:, 1:] = ~torch.where(use_b, down[:, 1:], right[1:])
    elif method == "raster":
        keep[:, 1:] = ~right
        grid = words.view(rows, BLOCK_SIZE, cols, _ROW_WORDS)
        keep[1:, 0] = (grid[1:, :, 0] != grid[:-1, :, -1]).flatten(1).any(dim=1)
    else:
        keep[0::2, 1:] = ~right[0::2]
        keep[1::2, :-1] = ~right[1::2]
        keep[2::2, 0] = ~down[1::2, 0]
        keep[1::2, -1] = ~down[0::2, -1]
    keep[0, 0] = True
    return keep


class _PairTest:
    """Vectorised `dist(block i, block j) <= thr` for index tensors i, j
    (blocks gathered as int64 words, which is much faster than as bytes)."""

    def __init__(self, blocks: torch.Tensor, is_max: bool, thr: int):
        self.words = blocks.contiguous().view(torch.int64)  # (n, 384)
        self.is_max, self.thr = is_max, thr

    def __call__(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        a = self.words.index_select(0, i).view(torch.uint8)
        b = self.words.index_select(0, j).view(torch.uint8)
        diff = torch.maximum(a, b) - torch.minimum(a, b)
        dist = diff.amax(dim=1) if self.is_max else diff.sum(dim=1, dtype=torch.int32)
        return dist <= self.thr


def _wavefront_pred2d(similar: _PairTest, rows: int, cols: int) -> torch.Tensor:
    """pred2d with reconstruction tracking, one anti-diagonal r + c = k per step.
    Each step measures C~A, C~B, X~A, X~B for the whole diagonal in one batch
    (A, B, C are reconstructions: source indices), then picks the prediction."""
    device = similar.words.device
    src = torch.arange(rows * cols, device=device)
    keep = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    keep[0] = True
    table, starts = diagonal_table(rows, cols)
    table = torch.from_numpy(table).to(device)
    for start, stop in zip(starts[:-1], starts[1:]):
        x, left, up, corner, first_col, interior = table[:, start:stop]
        a, b, c = src[left], src[up], src[corner]
        sims = similar(torch.cat([c, c, x, x]), torch.cat([a, b, a, b])).view(4, -1)
        use_b = (sims[0] & ~sims[1] & interior.bool()) | first_col.bool()
        dropped = torch.where(use_b, sims[3], sims[2])
        src[x] = torch.where(dropped, torch.where(use_b, b, a), x)
        keep[x] = ~dropped
    return keep


def _anchor_scan(similar: _PairTest, order: torch.Tensor) -> torch.Tensor:
    """1-D scan with tracking: blocks after a kept block are dropped while within
    tau of it; each run is tested in growing vectorised chunks."""
    keep = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    keep[order[0]] = True
    anchor, pos, chunk, count = order[0], 0, 8, order.numel()  # pos: last position decided
    while pos < count - 1:
        candidates = order[pos + 1:pos + 1 + chunk]
        miss = torch.nonzero(~similar(candidates, anchor.expand_as(candidates)))
        if miss.numel() == 0:
            pos += candidates.numel()
            chunk *= 2
            continue
        first = int(miss[0, 0])
        pos += 1 + first
        anchor = order[pos]
        keep[anchor] = True
        chunk = max(8, 2 * (first + 1))
    return keep
