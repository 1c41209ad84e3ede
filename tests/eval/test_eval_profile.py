"""`pixelprune eval --profile`: a checkpoint answering in UI-Venus' form is scored in UI-Venus' space (exact
accuracies per category); the flag belongs to --model (a service has its own)."""

from __future__ import annotations

from eval_testlib import SCREENSPOT_EXPECTED, assert_table
from pixelprune.cli import main


def test_profile_reads_the_familys_answers(screenspot_dir, tmp_path, capsys):
    from pixelprune.model.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint", answer="[642,318]")  # UI-Venus' "[x,y]"
    md = tmp_path / "eval.md"
    assert main(["eval", str(screenspot_dir), "--model", str(checkpoint), "--device", "cpu", "--profile", "ui-venus",
                 "--settings", "full", "--markdown", str(md)]) == 0
    assert_table(md.read_text(), SCREENSPOT_EXPECTED, settings=("full",))
    assert f"from model {checkpoint} (cpu, float32) profile ui-venus" in capsys.readouterr().out


def test_profile_goes_with_model(screenspot_dir, tmp_path, capsys):
    assert main(["eval", str(screenspot_dir), "--target", "127.0.0.1:1", "--profile", "holo2"]) == 2
    assert capsys.readouterr().err.strip() == ("pixelprune eval: error: --profile goes with --model; the service has "
                                               "its own (pixelprune serve --profile)")
    assert main(["eval", str(screenspot_dir), "--model", str(tmp_path / "absent"), "--profile", "owl"]) == 2
    assert capsys.readouterr().err.strip().endswith("unknown profile 'owl'; expected auto or one of qwen3-vl, "
                                                    "gui-owl, ui-venus, mai-ui, stepgui, holo2")
