"""`pixelprune stats`: kept/total per image, per category and overall, on
generated images with known kept counts and on the shared corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelprune.cli import main
from pixelprune.stats import compute_stats, load_image


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """uniform.png (1 of 64 blocks kept), dot.png (4 of 64 with pred2d, 3 with raster),
    noise.png (64 of 64), sub/small.png (uniform 100x70: 1 of 70 resized, 1 of 6 cropped)."""
    root = tmp_path / "shots"
    save(root / "uniform.png", np.full((256, 256, 3), (10, 20, 30), np.uint8))
    dot = np.full((256, 256, 3), 255, np.uint8)
    dot[64:96, 96:128] = 0  # block (2, 3) black
    # pred2d keeps the anchor, (2,3) (left is white), (2,4) (predicted from black A),
    # (3,3) (vertical edge: predicted from black B); everything else is predicted exactly.
    save(root / "dot.png", dot)
    save(root / "noise.png", np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    save(root / "sub" / "small.png", np.full((70, 100, 3), 200, np.uint8))
    (root / "notes.txt").write_text("not an image")
    (root / "manifest.json").write_text(json.dumps([
        {"file": "uniform.png", "category": "web", "source": "generated"},
        {"file": "dot.png", "category": "web"},
        {"file": "noise.png", "category": "mobile"},
    ]))
    return root


def by_name(report):
    return {Path(s.path).name: s for s in report.images}


def test_known_kept_counts_resized(folder):
    report = compute_stats([folder])
    images = by_name(report)
    assert list(images) == ["dot.png", "noise.png", "small.png", "uniform.png"]  # sorted paths, recursive
    assert (images["uniform.png"].kept, images["uniform.png"].total) == (1, 64)
    assert (images["dot.png"].kept, images["dot.png"].total) == (4, 64)
    assert (images["noise.png"].kept, images["noise.png"].total) == (64, 64)
    # 100x70 -> smart_resize -> 320x224 (min_pixels 65536): 10 x 7 blocks
    small = images["small.png"]
    assert (small.kept, small.total, small.size, small.original_size) == (1, 70, (320, 224), (100, 70))
    assert small.category is None and images["dot.png"].category == "web"
    groups = {g.name: g for g in report.categories}
    assert list(groups) == ["mobile", "web"]
    assert (groups["web"].images, groups["web"].kept, groups["web"].total) == (2, 5, 128)
    assert (groups["mobile"].kept, groups["mobile"].total) == (64, 64)
    assert (report.overall.images, report.overall.kept, report.overall.total) == (4, 70, 262)
    assert report.overall.retain_ratio == 70 / 262  # sum kept / sum total, not a mean of ratios


def test_method_and_crop(folder):
    report = compute_stats([folder / "dot.png", folder / "sub"], method="raster", resize=False)
    images = by_name(report)
    assert (images["dot.png"].kept, images["dot.png"].total) == (3, 64)  # anchor, black, white after black
    assert (images["small.png"].kept, images["small.png"].total, images["small.png"].size) == (1, 6, (96, 64))
    assert report.method == "raster" and report.resize is False


def test_files_given_twice_are_counted_once(folder):
    report = compute_stats([folder / "dot.png", folder, folder / "dot.png"])
    assert report.overall.images == 4


def test_transparency_composited_on_white(tmp_path):
    path = save(tmp_path / "clear.png", np.zeros((256, 256, 4), np.uint8))  # fully transparent black
    size, pixels = load_image(path)
    assert size == (256, 256) and (pixels == 255).all()


def test_manifest_in_a_parent_folder(tmp_path):
    root = tmp_path / "data"
    save(root / "a" / "x.png", np.zeros((64, 64, 3), np.uint8))
    (root / "manifest.json").write_text(json.dumps([{"file": "a/x.png", "category": "doc"}]))
    report = compute_stats([root])
    assert report.images[0].category == "doc" and [g.name for g in report.categories] == ["doc"]


def test_reference_keep_counts_on_corpus(corpus_dir, corpus_manifest):
    """Cropped like the authors' reference, the kept counts equal theirs exactly."""
    summary = {e["file"]: e for e in json.loads((corpus_dir / "reference" / "summary.json").read_text())}
    for method, key in (("pred2d", "pred_2d:exact:0.0"), ("raster", "raster:exact:0.0")):
        report = compute_stats([corpus_dir], method=method, resize=False)
        assert report.overall.images == len(corpus_manifest)
        for s in report.images:
            ref = summary[Path(s.path).name]
            assert (s.kept, s.total) == (ref["kept"][key], ref["blocks"]), s.path
            assert s.category == ref["category"]


def test_cli_json(folder, capsys):
    assert main(["stats", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"] == {"method": "pred2d", "metric": "max", "tau": 0.0, "resize": True}
    assert data["overall"] == {"name": "all", "images": 4, "kept": 70, "total": 262, "retain_ratio": 70 / 262}
    assert data["categories"]["web"]["kept"] == 5 and data["categories"]["mobile"]["total"] == 64
    first = data["images"][0]
    assert set(first) == {"path", "category", "original_size", "size", "kept", "total", "retain_ratio"}
    assert Path(first["path"]).name == "dot.png" and first["kept"] == 4 and first["retain_ratio"] == 4 / 64
    assert first["size"] == [256, 256]


def test_cli_table_and_progress(folder, capsys):
    assert main(["stats", str(folder), "--per-image", "--method", "raster"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "method raster, metric max, tau 0, smart_resize"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["dot.png"] == ["1", "3", "64", "4.7%"]
    assert rows["web"] == ["2", "4", "128", "3.1%"]
    assert rows["all"] == ["4", "69", "262", "26.3%"]
    assert "pixelprune stats" in captured.err  # tqdm progress bar on stderr for several images
    assert main(["stats", str(folder / "dot.png")]) == 0
    assert capsys.readouterr().err == ""  # no bar for a single image


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.png", "missing.png: no such file or directory"),
    (lambda d: (d / "bad.png").write_bytes(b"not a png") and d / "bad.png", "bad.png: cannot read image"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "empty: no images (png, jpg, jpeg, webp) found"),
    (lambda d: save(d / "tiny.png", np.zeros((20, 20, 3), np.uint8)), "tiny.png: 20x20 is smaller than one"),
])
def test_cli_errors(tmp_path, capsys, make, message):
    argv = ["stats", str(make(tmp_path))] + (["--no-resize"] if "tiny" in message else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelprune stats: error: ") and message in err and "\n" not in err


def test_cli_bad_manifest_and_settings(folder, capsys):
    assert main(["stats", str(folder), "--method", "zigzag"]) == 2
    assert "unknown method 'zigzag'" in capsys.readouterr().err
    (folder / "manifest.json").write_text(json.dumps({"file": "dot.png"}))
    assert main(["stats", str(folder)]) == 2
    assert "manifest.json: not a list of" in capsys.readouterr().err
