"""`pixelprune eval --model`: the rigged tiny checkpoint in process, exact accuracies."""

from __future__ import annotations

import json
import shutil

import pytest

from eval_testlib import (PRO_EXPECTED, SCREENSPOT_EXPECTED, assert_predictions, assert_table, markdown_rows,
                          read_jsonl)
from pixelprune.cli import main
from pixelprune.eval.data import choose, load_dataset
from pixelprune.eval.report import RANDOM_WEIGHTS_NOTE


def run_eval(data, checkpoint, *extra):
    return main(["eval", str(data), "--model", str(checkpoint), "--device", "cpu", *extra])


def test_screenspot_in_process_is_exact_per_category_and_setting(screenspot_dir, rigged_checkpoint, tmp_path,
                                                                 capsys):
    md, jsonl, png = tmp_path / "eval.md", tmp_path / "eval.jsonl", tmp_path / "eval.png"
    rc = run_eval(screenspot_dir, rigged_checkpoint, "--markdown", str(md), "--jsonl", str(jsonl), "--plot", str(png))
    out = capsys.readouterr().out
    assert rc == 0
    assert_table(md.read_text(), SCREENSPOT_EXPECTED)
    assert_predictions(jsonl, screenspot_dir)
    assert md.read_text().count(RANDOM_WEIGHTS_NOTE) == 1 and out.startswith(RANDOM_WEIGHTS_NOTE)
    assert f"30 of 30 answers, settings full, pred2d:max:0, pred2d:max:0.02, from model {rigged_checkpoint} " \
           "(cpu, float32)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_screenspot_pro_in_process_with_images_dir(pro_dirs, rigged_checkpoint, tmp_path, capsys):
    annotations, images = pro_dirs
    md, jsonl = tmp_path / "eval.md", tmp_path / "eval.jsonl"
    rc = run_eval(annotations, rigged_checkpoint, "--images", str(images), "--format", "screenspot-pro",
                  "--markdown", str(md), "--jsonl", str(jsonl))
    assert rc == 0, capsys.readouterr().err
    assert_table(md.read_text(), PRO_EXPECTED)
    assert_predictions(jsonl, annotations, images)


def test_rerun_with_the_same_jsonl_skips_what_is_there(screenspot_dir, rigged_checkpoint, tmp_path, capsys):
    jsonl = tmp_path / "eval.jsonl"
    two = ("--settings", "full,pred2d:max:0")
    assert run_eval(screenspot_dir, rigged_checkpoint, *two, "--limit", "4", "--jsonl", str(jsonl)) == 0
    first = jsonl.read_text()
    assert len(first.splitlines()) == 8
    capsys.readouterr()
    md = tmp_path / "eval.md"
    assert run_eval(screenspot_dir, rigged_checkpoint, *two, "--jsonl", str(jsonl), "--markdown", str(md)) == 0
    assert "resuming: 8 of 20 answers already in" in capsys.readouterr().err
    text = jsonl.read_text()
    assert text.startswith(first)  # the first run's lines (and their timings) untouched
    assert len(text.splitlines()) == 20 and len({(r["sample_id"], r["setting"]) for r in read_jsonl(jsonl)}) == 20
    assert_table(md.read_text(), SCREENSPOT_EXPECTED, settings=two[1].split(","))  # the table covers both runs
    assert run_eval(screenspot_dir, rigged_checkpoint, *two, "--jsonl", str(jsonl)) == 0
    assert jsonl.read_text() == text and "resuming: 20 of 20" in capsys.readouterr().err


def test_bad_samples_are_named_in_one_line_and_the_run_goes_on(screenspot_dir, rigged_checkpoint, tmp_path, capsys):
    data = shutil.copytree(screenspot_dir, tmp_path / "data")
    good = json.loads((data / "screenspot_mobile_v2.json").read_text())[0]  # a hit on the 400x300 image
    (data / "screenspot_desktop_v2.json").write_text(json.dumps([
        {**good, "img_filename": "imgs/nowhere.png"},
        {**good, "bbox": [10, 10, -4, 20]},
        {**good, "bbox": [390, 10, 20, 20]},  # x2 = 410 > 400
        {**good, "data_type": "text"},
    ]))
    (data / "notes.json").write_text(json.dumps({"author": "someone"}))
    md = tmp_path / "eval.md"
    rc = run_eval(data, rigged_checkpoint, "--settings", "full,pred2d:max:0", "--markdown", str(md))
    err = capsys.readouterr().err
    assert rc == 1  # some input was bad; the others were evaluated
    errors = [line.split("\r")[-1].strip() for line in err.splitlines() if "error:" in line]
    assert errors == [
        f"pixelprune eval: error: file {data / 'notes.json'}: unknown annotation format: expected a JSON list of "
        "ScreenSpot or ScreenSpot-Pro entries (or give --format screenspot/screenspot-pro)",
        "pixelprune eval: error: sample screenspot_desktop_v2:1: malformed bbox [10, 10, -4, 20] ([x, y, w, h]): "
        "width and height must be > 0",
        f"pixelprune eval: error: sample screenspot_desktop_v2:0: image {data / 'imgs' / 'nowhere.png'} not found",
        "pixelprune eval: error: sample screenspot_desktop_v2:2: bbox (x1, y1, x2, y2) = (390, 10, 410, 30) is "
        "outside the 400x300 image",
    ]
    assert "Traceback" not in err
    expected = {**SCREENSPOT_EXPECTED, "desktop/text": (1, 1), "all": (7, 11)}
    assert_table(md.read_text(), expected, settings=("full", "pred2d:max:0"))
    assert "## Not evaluated (4)" in md.read_text()


def test_nothing_to_evaluate_is_a_one_line_error(tmp_path, rigged_checkpoint, capsys):
    (tmp_path / "x.json").write_text(json.dumps([{"img": "a.png", "box": [1, 2, 3, 4]}]))
    assert run_eval(tmp_path / "x.json", rigged_checkpoint) == 2
    assert capsys.readouterr().err == (
        f"pixelprune eval: error: file {tmp_path / 'x.json'}: unknown annotation format: expected a JSON list of "
        "ScreenSpot or ScreenSpot-Pro entries (or give --format screenspot/screenspot-pro)\n")  # one message
    (tmp_path / "y.json").write_text(json.dumps({"author": "someone"}))
    assert run_eval(tmp_path, rigged_checkpoint) == 2  # several bad files: each named, then the verdict
    assert capsys.readouterr().err.splitlines()[-1] == f"pixelprune eval: error: no samples to evaluate in {tmp_path}"


def test_limit_categories_and_seed_pick_the_samples(screenspot_dir, rigged_checkpoint, tmp_path, capsys):
    chosen = []
    for run in range(2):
        jsonl = tmp_path / f"run{run}.jsonl"
        assert run_eval(screenspot_dir, rigged_checkpoint, "--categories", "icon", "--limit", "3", "--seed", "7",
                        "--settings", "full", "--jsonl", str(jsonl)) == 0
        chosen.append([r["sample_id"] for r in read_jsonl(jsonl)])
    assert chosen[0] == chosen[1]  # the same seed picks the same samples, in the same order
    expected = choose(load_dataset(screenspot_dir).samples, ["icon"], 3, 7)
    assert chosen[0] == [s.sample_id for s in expected]
    assert all(r["category"].endswith("/icon") for r in read_jsonl(tmp_path / "run0.jsonl"))
    capsys.readouterr()


def test_answers_without_a_point_are_misses_and_listed(screenspot_dir, no_point_checkpoint, tmp_path, capsys):
    md = tmp_path / "eval.md"
    assert run_eval(screenspot_dir, no_point_checkpoint, "--limit", "2", "--settings", "full,pred2d:max:0",
                    "--markdown", str(md)) == 0
    text = md.read_text()
    rows = markdown_rows(text)
    assert rows[("all", "full")][:4] == ["2", "0", "0.0 %", "2"]
    assert rows[("all", "pred2d:max:0")][:4] == ["2", "0", "0.0 %", "2"]
    assert "## No point in the answer (4, counted as misses)" in text
    for sample in ("screenspot_mobile_v2:0", "screenspot_mobile_v2:1"):
        for setting in ("full", "pred2d:max:0"):
            assert f"- `{sample}` ({setting}): `no point here`" in text
    assert "no point in the answer (4, counted as misses):" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--settings", "full,pred2d:max:2"], "pruning tau must be a finite number in [0, 1], got 2.0"),
    (["--settings", " , "], "--settings is empty"),
    (["--settings", "zigzag"], "unknown pruning method 'zigzag'"),
    (["--token-file", "t"], "--token-file goes with --target, not --model"),
    (["--tls", "--tls-ca", "ca.pem"], "--tls, --tls-ca go with --target, not --model"),
    (["--categories", "tablet"], "no samples in categories tablet"),
    (["--dtype", "int8"], "cannot load model"),
])
def test_bad_arguments_are_one_line_errors(screenspot_dir, rigged_checkpoint, capsys, args, message):
    assert run_eval(screenspot_dir, rigged_checkpoint, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixelprune eval: error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("model, message", [
    ("/nonexistent/checkpoint", "no such checkpoint directory: /nonexistent/checkpoint"),
    ("./tiny-qwen3", "no such checkpoint directory: ./tiny-qwen3"),
    ("a/b/c", "no such checkpoint directory: a/b/c"),
])
def test_a_wrong_model_path_is_named_before_anything_loads(screenspot_dir, tmp_path, monkeypatch, capsys, model,
                                                           message):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(screenspot_dir), "--model", model]) == 2
    assert capsys.readouterr().err == f"pixelprune eval: error: {message}\n"
