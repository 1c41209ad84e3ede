"""Reading ScreenSpot and ScreenSpot-Pro annotations (pixelprune.eval.data): no model here."""

from __future__ import annotations

import json

import pytest

from eval_testlib import PRO, SCREENSPOT, SIZES, box_xyxy
from pixelprune.eval.data import Sample, check_box, choose, detect_format, load_dataset


def _write(path, entries):
    path.write_text(json.dumps(entries))
    return path


def ss_entry(**over):
    entry = {"img_filename": "a.png", "bbox": [10, 20, 30, 40], "instruction": "the OK button",
             "data_type": "icon", "data_source": "windows"}
    return {**entry, **over}


def pro_entry(**over):
    entry = {"img_filename": "app/b.png", "bbox": [10, 20, 40, 60], "instruction": "the Run menu",
             "ui_type": "text", "group": "Dev", "platform": "macos"}
    return {**entry, **over}


def test_screenspot_boxes_are_xywh_and_categories_come_from_the_file_name(screenspot_dir):
    data = load_dataset(screenspot_dir)
    assert data.bad == ()
    assert set(data.formats.values()) == {"screenspot"}
    assert [s.sample_id for s in data.samples] == [f"screenspot_mobile_v2:{i}" for i in range(5)] + \
        [f"screenspot_web_v2:{i}" for i in range(5)]
    first = data.samples[0]
    assert first.category == "mobile/text" and first.image == screenspot_dir / "imgs" / "shot_400x300.png"
    assert first.box == pytest.approx(box_xyxy(SIZES[0], "hit"))  # [x, y, w, h] -> (x1, y1, x2, y2)
    assert [s.category for s in data.samples[5:]] == ["web/text"] + ["web/icon"] * 4
    assert len(data.samples) == sum(len(rows) for rows in SCREENSPOT.values())


def test_screenspot_without_a_split_in_the_file_name_uses_the_data_source(tmp_path):
    _write(tmp_path / "mine.json", [ss_entry(), ss_entry(data_source="android", data_type="text")])
    data = load_dataset(tmp_path / "mine.json")
    assert [s.category for s in data.samples] == ["windows/icon", "android/text"]
    assert data.samples[0].box == (10.0, 20.0, 40.0, 60.0)


def test_pro_boxes_are_xyxy_ids_are_kept_and_images_dir_is_used(pro_dirs, tmp_path):
    annotations, images = pro_dirs
    data = load_dataset(annotations, images=images)
    assert data.bad == () and set(data.formats.values()) == {"screenspot-pro"}
    assert [s.sample_id for s in data.samples] == [f"pro_{i}" for i in (3, 4, 5, 0, 1, 2)]  # cad.json < dev.json
    dev = {s.sample_id: s for s in data.samples}["pro_0"]
    assert dev.category == "Dev/text" and dev.image == images / "shot_400x300.png"
    assert dev.box == pytest.approx(box_xyxy(SIZES[0], "hit"))
    assert len(data.samples) == sum(len(rows) for rows in PRO.values())
    _write(tmp_path / "p.json", [pro_entry()])
    assert load_dataset(tmp_path / "p.json").samples[0].image == tmp_path / "app" / "b.png"


def test_format_detection_and_forced_format(tmp_path):
    assert detect_format(ss_entry()) == "screenspot"
    assert detect_format(pro_entry()) == "screenspot-pro"
    assert detect_format({"img_filename": "x.png", "bbox": [0, 0, 1, 1]}) is None
    _write(tmp_path / "p.json", [pro_entry()])
    forced = load_dataset(tmp_path / "p.json", fmt="screenspot")  # a Pro file read as ScreenSpot: no data_type
    assert forced.samples == ()
    assert [str(b) for b in forced.bad] == ["sample p:0: missing data_type, data_source for the screenspot format"]
    with pytest.raises(ValueError, match="unknown format 'coco'"):
        load_dataset(tmp_path / "p.json", fmt="coco")


@pytest.mark.parametrize("content", [{"images": []}, [1, 2], [{"img_filename": "a.png", "bbox": [0, 0, 1, 1]}], "x"])
def test_a_file_in_no_known_format_is_one_bad_file_and_the_others_load(tmp_path, content):
    _write(tmp_path / "a_good.json", [ss_entry()])
    (tmp_path / "b_other.json").write_text(json.dumps(content))
    data = load_dataset(tmp_path)
    assert [s.sample_id for s in data.samples] == ["a_good:0"]
    assert len(data.bad) == 1 and data.bad[0].what == "file"
    assert str(data.bad[0]).startswith(f"file {tmp_path / 'b_other.json'}: unknown annotation format")


def test_bad_entries_are_named_and_the_rest_loads(tmp_path):
    _write(tmp_path / "s.json", [
        ss_entry(), ss_entry(bbox=[10, 10, -5, 20]), ss_entry(bbox=[10, 10, 5]), ss_entry(bbox=[1, 2, "3", 4]),
        ss_entry(instruction=""), {"img_filename": "a.png"}, "text", ss_entry(id="dup"), ss_entry(id="dup"),
        ss_entry(bbox=[10, 10, 0, 20]), ss_entry(data_type=3)])
    data = load_dataset(tmp_path / "s.json")
    assert [s.sample_id for s in data.samples] == ["s:0", "dup"]
    assert [str(b) for b in data.bad] == [
        "sample s:1: malformed bbox [10, 10, -5, 20] ([x, y, w, h]): width and height must be > 0",
        "sample s:2: malformed bbox [10, 10, 5]: expected 4 numbers",
        "sample s:3: malformed bbox [1, 2, '3', 4]: expected 4 numbers",
        "sample s:4: instruction must be a non-empty string",
        "sample s:5: missing bbox, instruction, data_type, data_source for the screenspot format",
        "sample s:6: entry is a str, not an object",
        f"sample dup: duplicate sample id (entry 8 of {tmp_path / 's.json'})",
        "sample s:9: malformed bbox [10, 10, 0, 20] ([x, y, w, h]): width and height must be > 0",
        "sample s:10: data_type must be a non-empty string",
    ]
    _write(tmp_path / "q.json", [{k: v for k, v in pro_entry().items() if k != "platform"}])
    assert load_dataset(tmp_path / "q.json").samples[0].category == "Dev/text"  # platform is optional
    _write(tmp_path / "p.json", [pro_entry(bbox=[50, 20, 40, 60])])
    assert str(load_dataset(tmp_path / "p.json").bad[0]) == \
        "sample p:0: malformed bbox [50, 20, 40, 60] ([x1, y1, x2, y2]): needs x2 > x1 and y2 > y1"


def test_box_outside_the_image():
    sample = Sample("s", None, "x", (0.0, 10.0, 260.0, 500.0), "c")
    check_box(sample, (260, 500))  # touching the edges is inside
    for box in [(-1.0, 10.0, 20.0, 30.0), (0.0, -0.5, 20.0, 30.0), (0.0, 10.0, 260.5, 30.0), (0.0, 0.0, 10.0, 501.0)]:
        with pytest.raises(ValueError, match="outside the 260x500 image"):
            check_box(Sample("s", None, "x", box, "c"), (260, 500))


def test_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"no annotation files \(\*.json\)"):
        load_dataset(tmp_path)
    _write(tmp_path / "s.json", [ss_entry()])
    with pytest.raises(ValueError, match="--images .*: not a directory"):
        load_dataset(tmp_path, images=tmp_path / "s.json")


def test_choose_categories_limit_and_seed(screenspot_dir):
    samples = load_dataset(screenspot_dir).samples
    ids = lambda chosen: [s.sample_id for s in chosen]  # noqa: E731
    assert ids(choose(samples)) == ids(samples)
    mobile = choose(samples, ["mobile"])
    assert ids(mobile) == [f"screenspot_mobile_v2:{i}" for i in range(5)]
    assert {s.category for s in choose(samples, ["icon"])} == {"mobile/icon", "web/icon"}
    assert ids(choose(samples, ["web/text", "mobile/icon"])) == \
        ["screenspot_mobile_v2:3", "screenspot_mobile_v2:4", "screenspot_web_v2:0"]
    assert ids(choose(samples, limit=3)) == ids(samples[:3])
    picks = [ids(choose(samples, ["web"], limit=2, seed=seed)) for seed in range(8)]
    assert picks[3] == ids(choose(samples, ["web"], limit=2, seed=3))  # same seed, same subset
    assert all(len(p) == 2 and all(i.startswith("screenspot_web_v2:") for i in p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # the seed changes the subset
    assert sorted(ids(choose(samples, seed=5))) == sorted(ids(samples))  # a shuffle, nothing lost
    with pytest.raises(ValueError, match="no samples in categories desktop; the data has mobile/icon"):
        choose(samples, ["desktop"])
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        choose(samples, limit=0)
