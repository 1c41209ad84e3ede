"""Scoring, the prediction log and the tables of `pixelprune eval`, on hand-made predictions."""

from __future__ import annotations

import json

import pytest

from eval_testlib import markdown_rows
from pixelprune.eval.data import BadSample, Sample
from pixelprune.eval.records import Answer, Prediction, PredictionLog, is_hit, score
from pixelprune.eval.report import RANDOM_WEIGHTS_NOTE, markdown, plot, summarize, text_table


def pred(sample_id, setting, category, hit, point=(1.0, 2.0), kept=10, total=40, ttft=10.0, kv=1000,
         random_weights=False):
    return Prediction(sample_id=sample_id, setting=setting, category=category, point=point, hit=hit,
                      retain=kept / total, kept_blocks=kept, total_blocks=total, ttft_ms=ttft, kv_bytes=kv,
                      answer="(1, 2)" if point else "nothing", random_weights=random_weights)


def test_is_hit_counts_edges_and_no_point_is_a_miss():
    box = (10.0, 20.0, 30.0, 40.0)
    assert is_hit((10.0, 20.0), box) and is_hit((30.0, 40.0), box) and is_hit((15.5, 33.0), box)
    assert not is_hit((9.999, 25.0), box) and not is_hit((15.0, 40.001), box) and not is_hit(None, box)


def test_score_keeps_the_answer_and_computes_hit_and_retain():
    sample = Sample("s:1", None, "x", (100.0, 50.0, 140.0, 70.0), "web/icon")
    answer = Answer(point=(120.0, 70.0), raw_answer="(300, 700)", kept_blocks=12, total_blocks=48, ttft_ms=8.5,
                    kv_bytes=4096, random_weights=True)
    assert score(sample, "pred2d:max:0", answer) == Prediction(
        sample_id="s:1", setting="pred2d:max:0", category="web/icon", point=(120.0, 70.0), hit=True, retain=0.25,
        kept_blocks=12, total_blocks=48, ttft_ms=8.5, kv_bytes=4096, answer="(300, 700)", random_weights=True)


def test_summary_rows_are_exact_per_category_and_setting():
    preds = [pred("a", "full", "web/icon", True, kept=40, ttft=30.0, kv=3000),
             pred("b", "full", "web/icon", False, kept=40, ttft=10.0, kv=1000),
             pred("c", "full", "mobile/text", True, kept=20, total=20, ttft=20.0, kv=None),
             pred("a", "pred2d:max:0", "web/icon", True, kept=10, ttft=5.0),
             pred("b", "pred2d:max:0", "web/icon", False, point=None, kept=30, ttft=7.0),
             pred("c", "pred2d:max:0", "mobile/text", True, kept=5, total=20, ttft=3.0)]
    summary = summarize(preds, ["full", "pred2d:max:0"], source="model m", bad=(BadSample("z", "image missing"),),
                        planned=6, interrupted=False)
    assert [(r.category, r.setting) for r in summary.rows] == [
        ("mobile/text", "full"), ("mobile/text", "pred2d:max:0"), ("web/icon", "full"), ("web/icon", "pred2d:max:0"),
        ("all", "full"), ("all", "pred2d:max:0")]
    web_full, all_pruned = summary.row("web/icon", "full"), summary.row("all", "pred2d:max:0")
    assert (web_full.samples, web_full.hits, web_full.accuracy, web_full.retain_ratio) == (2, 1, 0.5, 1.0)
    assert (web_full.ttft_p50_ms, web_full.kv_bytes_mean) == (20.0, 2000)
    assert (all_pruned.samples, all_pruned.hits, all_pruned.no_point) == (3, 2, 1)
    assert all_pruned.retain_ratio == 45 / 100  # sum kept / sum blocks, not the mean of ratios
    assert all_pruned.ttft_p50_ms == 5.0
    assert summary.row("mobile/text", "full").kv_bytes_mean is None  # never reported: n/a
    assert summary.row("all", "full").kv_bytes_mean == 2000  # the unreported one does not count as 0
    assert [p.sample_id for p in summary.no_point] == ["b"] and not summary.random_weights

    md = markdown(summary)
    rows = markdown_rows(md)
    assert rows[("web/icon", "full")] == ["2", "1", "50.0 %", "0", "100.0 %", "20.0", "2000"]
    assert rows[("all", "pred2d:max:0")] == ["3", "2", "66.7 %", "1", "45.0 %", "5.0", "1000"]
    assert rows[("mobile/text", "full")][-1] == "n/a"
    assert "6 of 6 answers, settings full, pred2d:max:0, from model m." in md
    assert "- `b` (pred2d:max:0): `nothing`" in md and "- `z`: image missing" in md
    assert RANDOM_WEIGHTS_NOTE not in md
    text = text_table(summary)
    assert "no point in the answer (1, counted as misses):\n  b [pred2d:max:0]: 'nothing'" in text
    assert "not evaluated (1):\n  sample z: image missing" in text


def test_random_weights_and_interruption_are_said(tmp_path):
    summary = summarize([pred("a", "full", "c", True, random_weights=True)], ["full", "pred2d:max:0"], source="x",
                        bad=(), planned=4, interrupted=True)
    assert summary.random_weights
    assert text_table(summary).splitlines()[:2] == [RANDOM_WEIGHTS_NOTE, "interrupted: 1 of 4 answers, settings "
                                                                         "full, pred2d:max:0, from x"]
    assert f"> **{RANDOM_WEIGHTS_NOTE}**" in markdown(summary)
    plot(summary, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prediction_log_appends_flushes_and_resumes(tmp_path):
    path = tmp_path / "run.jsonl"
    log = PredictionLog(path)
    first = pred("a", "full", "web/icon", True)
    log.add(first)
    assert json.loads(path.read_text()) == {  # flushed at once, field names as documented
        "sample_id": "a", "setting": "full", "category": "web/icon", "point": [1.0, 2.0], "hit": True,
        "retain": 0.25, "kept_blocks": 10, "total_blocks": 40, "ttft_ms": 10.0, "kv_bytes": 1000,
        "answer": "(1, 2)", "random_weights": False, "answer_logprob": None}
    log.add(pred("b", "full", "web/icon", False, point=None, kv=None))
    log.close()
    again = PredictionLog(path)
    assert again.resumed == 2 and again.done[("a", "full")] == first
    assert again.done[("b", "full")].point is None and again.done[("b", "full")].kv_bytes is None
    again.close()


def test_prediction_log_drops_a_line_cut_short(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    good = json.dumps(pred("a", "full", "c", True).to_json())
    path.write_text(good + "\n" + '{"sample_id": "b", "setting": "full", "categ')  # killed mid-write
    log = PredictionLog(path)
    assert list(log.done) == [("a", "full")]
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().err
    log.add(pred("c", "full", "c", False))
    log.close()
    assert [json.loads(line)["sample_id"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_prediction_from_json_rejects_other_objects():
    with pytest.raises(ValueError, match="not a prediction"):
        Prediction.from_json({"sample_id": "a"})
    with pytest.raises(ValueError, match="not a prediction"):
        Prediction.from_json([1, 2])
