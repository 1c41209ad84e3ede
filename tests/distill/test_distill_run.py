"""`pixelprune distill` end to end on the tiny random-weight checkpoint and small screenshots:
a short run lowers the held-out KL and its checkpoint serves through the gRPC service; lr 0
changes nothing; --resume continues from the saved step; LoRA is merged; Ctrl-C saves a
resumable checkpoint; bad arguments are one line."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distill_testlib import png_bytes, run_cli, screenshot
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
# the CEO's flags (fewer steps); short answers keep the tests fast
SHORT = ["--alpha", "0", "--labels", "teacher", "--lr", "1e-5", "--batch-size", "2", "--answer-tokens", "8"]


def _distill(shots_dir, base, out: Path, *flags: str) -> dict:
    code = run_cli([str(shots_dir / "screenspot_mobile_v2.json"), "--model", str(base), "--out", str(out), *flags])
    assert code == 0
    return json.loads((out / "distill.json").read_text())


@pytest.fixture(scope="module")
def trained(shots_dir, tiny_checkpoint, tmp_path_factory):
    """(out dir, record) of 8 steps with held-out metrics and a report."""
    out = tmp_path_factory.mktemp("distill-run") / "out"
    record = _distill(shots_dir, tiny_checkpoint, out, *SHORT, "--max-steps", "8", "--save-steps", "4",
                      "--heldout", "0.34", "--report", str(out.parent / "report.json"))
    return out, record


def test_a_short_run_lowers_the_heldout_kl_and_records_its_provenance(trained, tiny_checkpoint):
    out, record = trained
    before, after = record["heldout_metrics"]["before"], record["heldout_metrics"]["after"]
    assert after["kl_per_token"] < 0.9 * before["kl_per_token"]
    assert record["heldout_metrics"]["kl_ratio"] == pytest.approx(after["kl_per_token"] / before["kl_per_token"])
    assert before["samples"] == after["samples"] == 4 and before["answer_tokens"] == after["answer_tokens"] > 0
    assert before["click_samples"] == 4 and before["retain_ratio"] == after["retain_ratio"] < 1
    assert (record["base"], record["base_random_weights"], record["steps_done"]) == (str(tiny_checkpoint), True, 8)
    assert [entry["step"] for entry in record["loss_curve"]] == list(range(1, 9))
    assert all(entry["ce"] > 0 and entry["kl"] > 0 and entry["answer_tokens"] > 0 for entry in record["loss_curve"])
    assert record["plan"]["warmup_steps"] == 0 and record["plan"]["gradient_checkpointing"] is True
    data = record["data"]
    assert (data["train_rows"], data["heldout_rows"], data["train_screenshots"], data["heldout_screenshots"]) == (
        8, 4, 4, 2)
    assert len(data["files"][0]["sha256"]) == 64 and data["files"][0]["format"] == "screenspot"
    assert json.loads((out.parent / "report.json").read_text()) == record
    assert "RANDOM WEIGHTS" in (out / "README.md").read_text()


def test_the_distilled_checkpoint_serves_and_answers(trained, tiny_checkpoint):
    import grpc

    from pixelprune_api.grounding.v1 import grounding_pb2 as pb
    from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc
    from service.config import configure
    from service.server import create_server

    out, _ = trained
    assert not any(out.glob("adapter_*")) and (out / "model.safetensors").is_file()
    base, tuned = load_file(str(tiny_checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert base.keys() == tuned.keys() and any(not np.array_equal(base[k], tuned[k]) for k in base)
    handle = create_server(configure(model=str(out), device="cpu", host="127.0.0.1", port=0, metrics_port=-1,
                                         health_port=-1, max_new_tokens=4))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            reply = pb_grpc.GroundingStub(channel).Ground(pb.GroundRequest(
                image=pb.Image(encoded=png_bytes(screenshot((320, 256), 9))), instruction="the blue button"),
                timeout=60)
    finally:
        handle.stop(grace=0)
    assert reply.random_weights and reply.raw_answer and 0 < reply.kept_blocks < reply.total_blocks == 80


def test_learning_rate_zero_changes_no_weight_and_no_heldout_metric(shots_dir, tiny_checkpoint, tmp_path):
    record = _distill(shots_dir, tiny_checkpoint, tmp_path / "out", *SHORT, "--lr", "0", "--max-steps", "2",
                      "--heldout", "0.17")  # one screenshot
    base = load_file(str(tiny_checkpoint / "model.safetensors"))
    tuned = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert base.keys() == tuned.keys() and all(np.array_equal(base[k], tuned[k]) for k in base)
    metrics = record["heldout_metrics"]
    assert metrics["before"] == metrics["after"] and metrics["kl_ratio"] == 1.0


def test_lora_is_trained_and_merged_into_a_plain_checkpoint(shots_dir, tiny_checkpoint, tmp_path):
    record = _distill(shots_dir, tiny_checkpoint, tmp_path / "out", *SHORT, "--method", "lora", "--lr", "1e-3",
                      "--max-steps", "4", "--heldout", "0.17")
    metrics = record["heldout_metrics"]
    assert metrics["after"]["kl_per_token"] < metrics["before"]["kl_per_token"]
    out = tmp_path / "out"
    assert not any(out.glob("adapter_*")) and record["method"] == "lora"
    base, tuned = load_file(str(tiny_checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert base.keys() == tuned.keys()
    changed = [k for k in base if not np.array_equal(base[k], tuned[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    assert not any("norm" in k or "embed" in k for k in changed)  # LoRA touches linear layers only


def _interrupt_after_first_step(command: list[str]) -> tuple[int, str]:
    """Run the CLI in a subprocess, send SIGINT once its progress bar shows step 1: (exit status, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pixelprune.cli", "distill", *command], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)
    seen = ""
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"\| [1-9]\d*/", seen) and process.poll() is None and time.monotonic() < deadline:
            seen += process.stderr.read(1)
        process.send_signal(signal.SIGINT)
        seen += process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, seen


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(shots_dir, tiny_checkpoint, tmp_path, capsys):
    out, steps = tmp_path / "out", 20  # room for the signal to land before the last step
    args = [str(shots_dir / "screenspot_mobile_v2.json"), "--model", str(tiny_checkpoint), "--max-steps", str(steps),
            "--save-steps", "1000", "--seed", "3"]
    code, err = _interrupt_after_first_step([*args, "--out", str(out)])
    assert code == 130, err
    (checkpoint,) = (out / "checkpoints").iterdir()
    stopped = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert checkpoint.name == f"checkpoint-{stopped}" and 1 <= stopped < steps
    assert f"stopped at step {stopped}; a checkpoint is in {out / 'checkpoints'}" in err
    assert not (out / "model.safetensors").exists()
    capsys.readouterr()
    assert run_cli([*args, "--out", str(out), "--resume", "--alpha", "0.2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"pixelprune distill: error: --resume: the run in {out} was started with alpha = 0.5, not 0.2; "
        "use the same arguments")
    assert run_cli([*args, "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "distill.json").read_text())
    assert (resumed["resumed_from_step"], resumed["steps_done"]) == (stopped, steps)
    assert run_cli([*args, "--out", str(tmp_path / "whole")]) == 0  # the same run, never stopped
    whole = json.loads((tmp_path / "whole" / "distill.json").read_text())
    assert resumed["loss_curve"] == whole["loss_curve"]  # the same weights, optimizer state, lr and data order
    left, right = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert all(np.array_equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("flags, message", [
    (["--settings", "full", "--alpha", "0"], "nothing to distil: with --settings full"),
    (["--heldout", "1.5"], "--heldout fraction must be between 0 and 1"),
    (["--heldout", "no-such-file"], "--heldout no-such-file: neither a fraction"),
    (["--resume"], "--resume: {out} holds no distillation run to resume"),
    (["--method", "lora", "--fsdp", "fsdp"], "--fsdp goes with --method full"),
    (["--deepspeed", "zero9"], "--deepspeed zero9: no such file (the configs shipped with pixelprune: fsdp, zero2)"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    pytest.param(["--deepspeed", "zero2"], "--deepspeed needs the deepspeed package: pip install deepspeed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None,
                                          reason="deepspeed is installed here")),
])
def test_bad_arguments_are_one_line(shots_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code = run_cli([str(shots_dir / "screenspot_mobile_v2.json"), "--model", "unused", "--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("pixelprune distill: error: ")]
    assert code == 2 and errors == err[-1:]
    assert message.format(out=out) in errors[0]


def test_a_used_out_directory_is_refused(shots_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code = run_cli([str(shots_dir / "screenspot_mobile_v2.json"), "--model", "unused", "--out", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"pixelprune distill: error: --out {tmp_path} is not empty; choose a new directory, or give --resume "
        "to continue a run there")


def test_two_processes_share_the_work_and_count_tokens_over_both(shots_dir, tiny_checkpoint, tmp_path):
    """torchrun with two CPU processes (gloo): data parallel training, teacher answers shared out,
    answer tokens counted over both processes, one set of messages and files."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "pixelprune.cli", "distill", str(shots_dir / "screenspot_mobile_v2.json"), "--model",
               str(tiny_checkpoint), "--out", str(out), *SHORT, "--batch-size", "1", "--max-steps", "3",
               "--heldout", "0.17"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group: a timeout ends the workers too
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    assert stderr.count("training rows on") == 1 and stdout.count("KL per answer token") == 1
    record = json.loads((out / "distill.json").read_text())
    assert record["steps_done"] == 3 and record["heldout_metrics"]["after"]["samples"] == 2
    # one row per process and step: every step counts the answer tokens of two rows (9 at most each)
    assert all(entry["answer_tokens"] > 9 for entry in record["loss_curve"])
    state = json.loads((out / "distill_state.json").read_text())
    assert sorted(state["train_answers"]) == sorted(f"screenspot_mobile_v2:{i}" for i in range(12)
                                                    if f"screenspot_mobile_v2:{i}" not in state["heldout_answers"])
