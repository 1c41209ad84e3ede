"""`pixelprune serve --profile`: rigged tiny checkpoints answering in a family's form, served through a
real gRPC server, click the exact pixel of the screenshot as sent (a HiDPI one included); `auto`
names its choice in the log and in /metrics; the MoE variant serves; unknown profiles are one line."""

from __future__ import annotations

import logging

import pytest

from pixelprune.cli import main
from pixelprune.model.tiny import write_tiny_checkpoint
from pixelprune.profiles import PROFILES
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.config import configure, from_args_and_env
from service_testlib import scrape, stub_for

HIDPI = "web_django_models_2880x1800.png"
PHONE = "mobile_flask_quickstart_1170x2532.png"


def serve(model, **overrides):
    from service.server import create_server, load_engine

    config = configure(model=str(model), port=0, metrics_port=0, health_port=0,
                                 host="127.0.0.1", max_batch_tokens=16384, **overrides)
    return create_server(config, engine=load_engine(config), warmup=True)


def ground(channels, handle, corpus_dir, name):
    request = pb.GroundRequest(image=pb.Image(encoded=(corpus_dir / name).read_bytes()), instruction="the Save button")
    return stub_for(channels(handle.port)).Ground(request, timeout=300)


def test_moe_checkpoint_served_with_auto_profile(tmp_path, channels, corpus_dir, caplog):
    """A Holo2-30B-A3B stand-in: MoE, named like it, answering Holo2's {"x", "y"}; `auto` picks holo2."""
    model = write_tiny_checkpoint(tmp_path / "tiny-holo2-30b-a3b", answer='{"x": 642, "y": 318}',
                                  arch="qwen3_vl_moe")
    with caplog.at_level(logging.INFO, logger="service.server"):
        handle = serve(model, max_new_tokens=24)
    try:
        response = ground(channels, handle, corpus_dir, HIDPI)
        assert response.raw_answer == '{"x": 642, "y": 318}' and response.found and response.random_weights
        assert (response.point.x, response.point.y) == (642 / 1000 * 2880, 318 / 1000 * 1800)
        assert (response.point_normalized.x, response.point_normalized.y) == (0.642, 0.318)
        metrics = scrape(handle.metrics_port)
        assert metrics[f'pixelprune_model_info{{model={model},profile=holo2}}'] == 1.0
        assert "profile holo2 (auto: 'holo2' in the checkpoint's name)" in caplog.text
    finally:
        handle.stop(grace=0)


def test_profile_flag_serves_a_family_that_reasons_first(tmp_path, channels, corpus_dir, caplog):
    """MAI-UI's form (reasoning with a decoy point, then the answer), --profile mai-ui on a checkpoint whose name
    says nothing; a --max-new-tokens too short for the family is warned about."""
    answer = '<grounding_think>not [10,20]</grounding_think>\n<answer>\n{"coordinate": [642,318]}\n</answer>'
    model = write_tiny_checkpoint(tmp_path / "checkpoint-7", answer=answer)
    with caplog.at_level(logging.INFO, logger="service.server"):
        handle = serve(model, max_new_tokens=64, profile="mai-ui")
    try:
        response = ground(channels, handle, corpus_dir, PHONE)
        assert response.raw_answer == answer
        assert (response.point.x, response.point.y) == (642 / 1000 * 1170, 318 / 1000 * 2532)
        assert scrape(handle.metrics_port)[f'pixelprune_model_info{{model={model},profile=mai-ui}}'] == 1.0
        assert "profile mai-ui (asked for)" in caplog.text
        assert "--max-new-tokens 64 is shorter than a whole mai-ui answer (~256 tokens)" in caplog.text
    finally:
        handle.stop(grace=0)


def test_unknown_profile_is_one_line(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "never-loaded"), "--profile", "gui_owl", "--device", "cpu",
                 "--metrics-port", "-1"]) == 2
    assert capsys.readouterr().err.strip() == ("pixelprune serve: error: unknown profile 'gui_owl'; expected auto or "
                                               "one of qwen3-vl, gui-owl, ui-venus, mai-ui, stepgui, holo2")


def test_profile_flag_environment_and_sessions(capsys):
    from service.server import session_key_prefix

    assert from_args_and_env([], {}).spec.profile == "auto"
    assert from_args_and_env([], {"PIXELPRUNE_PROFILE": "holo2"}).spec.profile == "holo2"
    assert from_args_and_env(["--profile", "stepgui"], {"PIXELPRUNE_PROFILE": "holo2"}).spec.profile == "stepgui"
    base = from_args_and_env(["--model", "/models/a"], {})
    assert session_key_prefix(base) != session_key_prefix(configure(base, profile="ui-venus"))
    with pytest.raises(SystemExit):
        from_args_and_env(["--help"], {})
    usage = " ".join(capsys.readouterr().out.split())
    assert all(name in usage for name in PROFILES) and "(default auto; env PIXELPRUNE_PROFILE)" in usage


def test_a_rigged_checkpoint_outside_float32_is_warned_about(tmp_path, caplog):
    from service.server import load_engine

    model = write_tiny_checkpoint(tmp_path / "rigged", answer="[1, 2]")
    config = configure(model=str(model), device="cpu", dtype="bfloat16")
    with caplog.at_level(logging.WARNING, logger="service.server"):
        load_engine(config)
    assert f"{model} is rigged to a fixed answer, which holds in float32 only (--dtype float32)" in caplog.text
