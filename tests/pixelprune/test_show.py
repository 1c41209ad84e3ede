"""`pixelprune show` / render_keep: pruned blocks dimmed, kept blocks untouched,
grid on block boundaries, a label strip below the image (covering none of it), and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pixelprune.cli import main
from pixelprune.geometry import resize_to
from pixelprune.selectors import select_blocks
from pixelprune.show import DIM_COLOR, DIM_STRENGTH, GRID_COLOR, GRID_STRENGTH, LABEL_FILL, render_keep


def interior(a: np.ndarray, r: int, c: int, line: int = 1) -> np.ndarray:
    """Block (r, c) without its first `line` rows and columns (where the grid is drawn)."""
    return a[r * 32 + line:(r + 1) * 32, c * 32 + line:(c + 1) * 32]


@pytest.fixture()
def pixels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)  # 3 x 4 blocks


KEEP = np.array([[1, 0, 0, 1],
                 [0, 1, 0, 0],
                 [1, 1, 0, 1]], dtype=bool)


def test_kept_blocks_unchanged_pruned_blocks_dimmed(pixels):
    out = np.asarray(render_keep(pixels, KEEP, show_ratio=False))
    assert out.shape == pixels.shape and out.dtype == np.uint8
    expected_dim = np.rint(pixels + DIM_STRENGTH * (DIM_COLOR - pixels.astype(np.float32))).astype(np.uint8)
    for r in range(3):
        for c in range(4):
            if KEEP[r, c]:
                assert np.array_equal(interior(out, r, c), interior(pixels, r, c))
            else:
                assert np.array_equal(interior(out, r, c), interior(expected_dim, r, c))


def test_pruned_darker_than_kept_pixelwise():
    white = np.full((64, 96, 3), 255, np.uint8)
    keep = np.zeros((2, 3), dtype=bool)
    keep[0, 0] = True
    out = np.asarray(render_keep(white, keep, show_ratio=False)).astype(int)
    kept_min = interior(out, 0, 0).min()
    for r, c in [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]:
        assert interior(out, r, c).max() < kept_min  # every pruned pixel darker than every kept one
    assert kept_min == 255


def test_grid_on_block_boundaries(pixels):
    keep = np.ones((3, 4), dtype=bool)
    plain = np.asarray(render_keep(pixels, keep, grid=False, show_ratio=False))
    assert np.array_equal(plain, pixels)  # nothing pruned, no grid, no label: the image itself
    gridded = np.asarray(render_keep(pixels, keep, show_ratio=False)).astype(np.float32)
    line = pixels[32, 5].astype(np.float32)  # first pixel row of block row 1
    assert np.array_equal(gridded[32, 5], np.rint(line + GRID_STRENGTH * (GRID_COLOR - line)))
    changed = np.any(gridded != pixels, axis=2)
    assert not changed[np.arange(96) % 32 != 0][:, np.arange(128) % 32 != 0].any()  # only lines move


def test_label_below_the_image_covers_none_of_it_and_is_legible():
    big = np.full((2176, 3840, 3), 255, np.uint8)
    keep = np.zeros((68, 120), dtype=bool)
    keep[0, 0] = keep[-1, -1] = True
    out = np.asarray(render_keep(big, keep, "pred2d, tau 0 (lossless), smart_resize"))
    unlabelled = np.asarray(render_keep(big, keep, show_ratio=False))
    assert out.shape[1:] == big.shape[1:] and out.shape[0] > big.shape[0]
    assert np.array_equal(out[:2176], unlabelled)  # every pixel of the image as without a label (menus included)
    strip = out[2176:]
    text = np.flatnonzero((strip.max(axis=2) > 100).any(axis=1))  # rows holding light text on the dark strip
    assert text.max() - text.min() > 150  # three lines of ~60 px text on 4K
    assert strip.shape[0] < 400 and (strip[:, -200:] == LABEL_FILL).all()  # dark, and no wider than the text


def test_label_shrinks_on_tiny_image(pixels):
    out = render_keep(pixels, KEEP, "a long caption that would not fit into a 128 px wide picture at all")
    assert out.size[0] == 128 and 96 < out.size[1] < 200
    assert np.array_equal(np.asarray(out)[:96], np.asarray(render_keep(pixels, KEEP, show_ratio=False)))


def test_bad_keep(pixels):
    with pytest.raises(ValueError, match="shape"):
        render_keep(pixels, np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        render_keep(pixels, np.ones((3, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiples of 32"):
        render_keep(pixels[:50], np.ones((1, 4), dtype=bool))


def test_cli_writes_picture(tmp_path, capsys):
    src = tmp_path / "shot.png"
    page = np.full((720, 1280, 3), 255, np.uint8)
    page[100:130, 200:700] = 0  # a black bar
    Image.fromarray(page).save(src)
    out = tmp_path / "kept.png"
    assert main(["show", str(src), "-o", str(out)]) == 0
    picture = Image.open(out)
    width, height = picture.size
    assert width == 1280 and height > 704  # smart_resize(720, 1280), then the label below
    keep = select_blocks(resize_to(page, 704, 1280))
    assert capsys.readouterr().out == (f"{out}: 1280x{height} (the 1280x704 image the selector saw, the label below "
                                       f"it), kept {keep.sum()}/880 blocks ({100 * keep.mean():.1f} %)\n")
    assert main(["show", str(src), "-o", str(tmp_path / "crop.png"), "--no-resize", "--tau", "0.1"]) == 0
    assert Image.open(tmp_path / "crop.png").size == (1280, height)  # 720 -> cropped to 22 blocks


def test_cli_errors(tmp_path, capsys):
    assert main(["show", str(tmp_path / "none.png"), "-o", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err == f"pixelprune show: error: {tmp_path / 'none.png'}: no such file or directory\n"
    src = tmp_path / "s.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src)
    assert main(["show", str(src), "-o", str(tmp_path / "o.unknownext")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelprune show: error:") and "cannot write the picture" in err and "\n" not in err
