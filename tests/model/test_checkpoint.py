"""pixelprune.model.checkpoint: what --model names, checked before anything loads. Paths must be
checkpoint directories; hub ids must be in the hub cache or answer one request (the CLI tests of
serve and eval assert the messages as users see them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pixelprune.model.checkpoint import CheckpointNotFound, check_model, looks_like_path

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh process: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported.
_CHECK = """
import sys
from pixelprune.model.checkpoint import check_model
try:
    print("ok", check_model(sys.argv[1]))
except (ValueError, OSError) as exc:
    print(type(exc).__name__, exc)
"""


def check_in_process(model: str, hf_home: Path, offline: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0",
           "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", _CHECK, model], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def cache_model(hf_home: Path, model: str) -> None:
    """The layout huggingface_hub writes for a downloaded config.json of `model`."""
    repo = hf_home / "hub" / ("models--" + model.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text('{"model_type": "qwen3_vl"}')


@pytest.mark.parametrize("value, is_path", [
    ("Qwen/Qwen3-VL-2B-Instruct", False), ("gpt2", False), ("org/name.v2_final", False),
    ("./tiny", True), ("../tiny", True), ("/models/qwen", True), ("~/qwen", True), (".", True),
    ("a/b/c", True), ("tiny/", True), ("org/na--me", True), ("org/..", True), ("my model", True), ("", True),
])
def test_what_looks_like_a_path(value, is_path):
    assert looks_like_path(value) == is_path


def test_a_checkpoint_directory_passes_as_given(tiny_checkpoint, tmp_path, monkeypatch):
    assert check_model(str(tiny_checkpoint)) == str(tiny_checkpoint)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert check_model("~/ckpt") == "~/ckpt"  # expanded to look, returned as given
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointNotFound, match=r"^~/ckpt is not a checkpoint \(no config.json\)$"):
        check_model("~/ckpt")


def test_a_hub_id_in_the_cache_needs_no_network(tmp_path):
    cache_model(tmp_path, "org/cached-model")
    assert check_in_process("org/cached-model", tmp_path, offline=True) == "ok org/cached-model"
    assert check_in_process("org/cached-model", tmp_path, offline=False) == "ok org/cached-model"


def test_a_hub_id_not_in_the_cache(tmp_path):
    offline = check_in_process("org/other-model", tmp_path, offline=True)
    assert offline.startswith("ModelUnavailable cannot fetch model org/other-model: it is not in the local Hugging "
                              "Face cache and HF_HUB_OFFLINE is set; for a test checkpoint that needs no network, run "
                              "`pixelprune tiny-checkpoint DIR`")
    online = check_in_process("org/other-model", tmp_path, offline=False)  # the endpoint refuses connections
    assert online.startswith("ModelUnavailable cannot fetch model org/other-model: it is not in the local Hugging "
                             "Face cache and http://127.0.0.1:9 cannot be reached (")
