"""`pixelprune distill` data: the four formats, bad rows (one line each, the rest loads), the
held-out split by screenshot and the refusal to train on a held-out or evaluated screenshot."""

from __future__ import annotations

import json
import shutil

import pytest
from distill_testlib import run_cli, screenshot, write_json
from PIL import Image

from pixelprune.distill.data import DistillSample, read_data
from pixelprune.distill.prepare import prepare_data
from pixelprune.distill.split import check_no_overlap, digest_map, image_info, scan, split_heldout
from pixelprune.points import grounding_prompt


def _shot(path, size=(256, 256), seed=0):
    Image.fromarray(screenshot(size, seed)).save(path)
    return path


def test_screenspot_rows_become_grounding_prompts_and_point_answers(shots_dir):
    data = read_data([shots_dir / "screenspot_mobile_v2.json"])
    assert data.bad == () and data.files == ((str(shots_dir / "screenspot_mobile_v2.json"), "screenspot"),)
    first = data.samples[0]
    assert first.sample_id == "screenspot_mobile_v2:0" and first.category == "mobile/icon"
    assert first.prompt == grounding_prompt("the search box 0") and first.image == shots_dir / "shot0.png"
    assert first.box == (160.0, 200.0, 240.0, 232.0)  # [x, y, w, h] read as x1, y1, x2, y2
    # centre (200, 216) of a 256 x 256 screenshot in 0..1000
    assert first.data_answer((256, 256)) == '{"point_2d": [781, 844]}'


def test_screenspot_pro_boxes_are_corners(tmp_path):
    _shot(tmp_path / "a.png")
    write_json(tmp_path / "pro.json", [{"img_filename": "a.png", "bbox": [10, 20, 110, 60], "instruction": "x",
                                        "ui_type": "text", "group": "Dev", "id": "p1"}])
    (sample,) = read_data([tmp_path / "pro.json"]).samples
    assert (sample.sample_id, sample.box, sample.category) == ("p1", (10.0, 20.0, 110.0, 60.0), "Dev/text")
    assert sample.data_answer((200, 100)) == '{"point_2d": [300, 400]}'


def test_os_atlas_nested_and_flat_rows_with_fractional_boxes(tmp_path):
    write_json(tmp_path / "linux.json", [
        {"img_filename": "a.png", "elements": [
            {"instruction": "Open the menu", "bbox": [0.1, 0.2, 0.3, 0.4], "data_type": "icon"},
            {"instruction": "", "bbox": [0.1, 0.2, 0.3, 0.4]},  # bad: empty instruction
            {"instruction": "In pixels?", "bbox": [10, 20, 30, 40]}]},  # bad: not fractions
        {"img_filename": "b.png", "elements": "none"},  # bad: elements not a list
        {"img_filename": "b.png", "instruction": "Close", "bbox": [0.5, 0.5, 0.7, 0.9]}])
    data = read_data([tmp_path / "linux.json"])
    assert data.files == ((str(tmp_path / "linux.json"), "os-atlas"),)
    assert [s.sample_id for s in data.samples] == ["linux:0.0", "linux:2"]
    nested, flat = data.samples
    assert nested.box_relative and nested.category == "icon" and nested.prompt == grounding_prompt("Open the menu")
    assert nested.data_answer((640, 480)) == '{"point_2d": [200, 300]}'
    assert flat.data_answer((10, 10)) == '{"point_2d": [600, 700]}'
    assert flat.relative_box((200, 100)) == (0.5, 0.5, 0.7, 0.9)
    assert [str(b).split(": ", 1)[0] for b in data.bad] == [
        f"{tmp_path / 'linux.json'} entry 0 element 1", f"{tmp_path / 'linux.json'} entry 0 element 2",
        f"{tmp_path / 'linux.json'} entry 1"]
    assert all("\n" not in str(b) for b in data.bad)


def test_sharegpt_jsonl_both_styles_and_bad_lines(tmp_path):
    rows = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhere is Save?"},
                                             {"from": "gpt", "value": '{"point_2d": [10, 20]}'}]},
        {"id": "m1", "images": ["b.png"], "messages": [
            {"role": "system", "content": "You are a GUI agent."},
            {"role": "user", "content": "Find the menu <image>"}]},  # unlabelled: fine for --labels teacher
        {"images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "two images"}]},
        {"image": "a.png", "conversations": [{"from": "gpt", "value": "no question"}]},
        {"image": "a.png", "conversations": [{"from": "robot", "value": "?"}]},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", ""]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    data = read_data([tmp_path / "chat.jsonl"])
    first, second = data.samples
    assert (first.sample_id, first.prompt, first.answer, first.system) == (
        "chat:1", "Where is Save?", '{"point_2d": [10, 20]}', None)
    assert first.messages()[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Where is Save?"}]
    assert (second.sample_id, second.prompt, second.answer, second.image) == ("m1", "Find the menu", None,
                                                                             tmp_path / "b.png")
    assert second.messages()[0] == {"role": "system", "content": "You are a GUI agent."}
    where = [b.where for b in data.bad]
    assert where == [f"{tmp_path / 'chat.jsonl'} line {n}" for n in (3, 4, 5, 6, 7)]
    messages = [b.message for b in data.bad]
    assert "exactly one image" in messages[0] and "one user turn" in messages[1]
    assert "unknown role 'robot'" in messages[2] and messages[3].startswith("not JSON") and messages[4] == "empty line"


def test_folders_unknown_files_and_duplicate_ids(tmp_path):
    _shot(tmp_path / "a.png")
    row = {"img_filename": "a.png", "bbox": [1, 2, 3, 4], "instruction": "x", "data_type": "text",
           "data_source": "ios", "id": "same"}
    write_json(tmp_path / "one.json", [row])
    (tmp_path / "sub").mkdir()
    write_json(tmp_path / "sub" / "two.json", [row])
    write_json(tmp_path / "sub" / "other.json", [{"something": "else"}])
    data = read_data([tmp_path])
    assert [s.sample_id for s in data.samples] == ["same", f"{tmp_path / 'sub' / 'two.json'}#same"]
    assert [b.where for b in data.bad] == [str(tmp_path / "sub" / "other.json")]
    assert "unknown annotation format" in data.bad[0].message
    forced = read_data([tmp_path / "one.json"], fmt="screenspot-pro")  # the wrong format: every row is bad
    assert forced.samples == () and "missing group, ui_type" in forced.bad[0].message
    with pytest.raises(ValueError, match="unknown format"):
        read_data([tmp_path], fmt="coco")


def test_digests_name_pixels_and_the_split_keeps_screenshots_whole(tmp_path):
    a = _shot(tmp_path / "a.png", seed=1)
    shutil.copy(a, tmp_path / "a_copy.png")
    Image.open(a).convert("RGBA").save(tmp_path / "a_rgba.png")  # same pixels, another encoding
    b, c = _shot(tmp_path / "b.png", seed=2), _shot(tmp_path / "c.png", seed=3)
    assert image_info(a) == image_info(tmp_path / "a_rgba.png") and image_info(a).digest != image_info(b).digest
    samples = [DistillSample(f"s{i}", path, "p") for i, path in
               enumerate([a, tmp_path / "a_copy.png", tmp_path / "a_rgba.png", b, c, tmp_path / "gone.png"])]
    infos = {}
    good, bad = scan(samples, infos)
    assert [s.sample_id for s in good] == ["s0", "s1", "s2", "s3", "s4"]
    assert len(bad) == 1 and bad[0].where == "sample s5" and "not found" in bad[0].message
    for seed in range(8):
        train, held = split_heldout(good, infos, 0.34, seed)  # one of three screenshots
        held_digests = {infos[s.image].digest for s in held}
        assert len(held_digests) == 1 and not held_digests & {infos[s.image].digest for s in train}
        assert len(train) + len(held) == 5 and len(held) in (1, 3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_heldout(good, infos, 1.0, 0)
    with pytest.raises(ValueError, match=r"refusing to train on 1 screenshot\(s\) that are also in the test set "
                                         r"\(e\.g\. .*a_copy\.png = .*a_rgba\.png\)"):
        check_no_overlap(good[1:2], infos, digest_map(good[2:3], infos), "the test set")


def test_prepare_refuses_overlap_and_unlabelled_rows(tmp_path, shots_dir):
    train = shots_dir / "screenspot_mobile_v2.json"
    shutil.copy(shots_dir / "shot3.png", tmp_path / "renamed.png")
    write_json(tmp_path / "eval.json", [{"img_filename": "renamed.png", "bbox": [0, 0, 8, 8], "instruction": "x",
                                         "data_type": "text", "data_source": "ios"}])
    with pytest.raises(ValueError, match=r"also in --eval-data .*eval\.json \(e\.g\. .*shot3\.png = .*renamed\.png\)"):
        prepare_data([str(train)], None, None, None, [str(tmp_path / "eval.json")], "data", 0, report=print)
    with pytest.raises(ValueError, match="also in --heldout"):
        prepare_data([str(train)], None, None, str(tmp_path / "eval.json"), [], "data", 0, report=print)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"image": str(shots_dir / "shot0.png"), "conversations": [
        {"from": "human", "value": "find it"}]}) + "\n")
    reported = []
    ready = prepare_data([str(train), str(tmp_path / "chat.jsonl")], None, None, None, [], "data", 0,
                         report=reported.append)
    assert [r.where for r in reported] == ["sample chat:1"] and "--labels teacher" in reported[0].message
    assert (len(ready.train), ready.heldout, ready.record["skipped_rows"]) == (12, (), 1)
    split = prepare_data([str(train)], None, None, "0.3", [], "data", 0, report=reported.append)
    assert (len(split.train), len(split.heldout), split.record["heldout_screenshots"]) == (8, 4, 2)
    teacher = prepare_data([str(train), str(tmp_path / "chat.jsonl")], None, None, None, [], "teacher", 0, print)
    assert len(teacher.train) == 13 and teacher.heldout == ()


def test_cli_reports_each_bad_row_on_one_line_and_refuses_before_loading_a_model(tmp_path, shots_dir, capsys):
    rows = json.loads((shots_dir / "screenspot_mobile_v2.json").read_text())
    rows[1]["bbox"] = [1, 2]
    rows[2] = "not an entry"
    write_json(tmp_path / "screenspot_mobile_v2.json", rows)
    code = run_cli([str(tmp_path / "screenspot_mobile_v2.json"), "--images", str(shots_dir), "--model",
                    str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), "--heldout",
                    str(shots_dir / "screenspot_mobile_v2.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 3
    assert err[0].startswith(f"pixelprune distill: skipped {tmp_path / 'screenspot_mobile_v2.json'} sample "
                             "screenspot_mobile_v2:1: malformed bbox")
    assert err[1].startswith("pixelprune distill: skipped ") and "not an object" in err[1]
    assert err[2].startswith("pixelprune distill: error: refusing to train on 6 screenshot(s) that are also in "
                             "--heldout")
    assert not (tmp_path / "out").exists()
