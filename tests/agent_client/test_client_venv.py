"""The client extra, really installed: a fresh virtualenv, `pip install '.[client]'` (the README's
command), then what landed there. No torch, no transformers, no numba or llvmlite (~200 MB the
client never imports); the installed `pixelprune-agent` asks a real server for its health and
grounds a screenshot on it, and the installed `pixelprune eval --target` evaluates through it.
Takes 10-20 s with a local package index (the fresh venv alone ~3 s)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent_testlib import POINTING_ANSWER

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "pixelprune", "pixelprune_api", "service", "agent_client")
MODEL_LIBRARIES = {"torch", "transformers", "safetensors", "numba", "llvmlite", "redis", "prometheus-client"}
MAX_VENV_BYTES = 200 * 1024 * 1024  # measured 142 MB (numpy 73, grpcio 19, pip 17, pillow 23); 355 MB with numba


def run(argv: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command outside this checkout's Python path (PYTHONPATH would shadow the venv's install)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tree_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if not p.is_dir())


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install '<a copy of the sources>[client]'` (the copy keeps build files
    out of this checkout)."""
    work = tmp_path_factory.mktemp("client-venv")
    source = work / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    venv = work / "venv"
    made = run([sys.executable, "-m", "venv", venv], work)
    assert made.returncode == 0, made.stderr
    installed = run([venv / "bin" / "pip", "install", "--quiet", f"{source}[client]"], work, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_the_client_extra_installs_no_model_library_and_no_jit(client_venv, tmp_path):
    listed = run([client_venv / "bin" / "pip", "list", "--format", "json"], tmp_path)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"pixelprune", "grpcio", "grpcio-health-checking", "protobuf", "mss", "numpy", "pillow"} <= names
    assert not names & MODEL_LIBRARIES, names & MODEL_LIBRARIES
    probe = run([client_venv / "bin" / "python", "-c",
                 "import importlib.util as u; print([m for m in ('torch', 'numba', 'llvmlite') if u.find_spec(m)])"],
                tmp_path)
    assert probe.stdout.strip() == "[]", probe.stderr
    assert tree_bytes(client_venv) < MAX_VENV_BYTES


@pytest.mark.slow
def test_the_installed_agent_checks_health_and_grounds(client_venv, pointing_server, token_file, screenshot,
                                                       tmp_path):
    from PIL import Image

    agent = client_venv / "bin" / "pixelprune-agent"
    target = ["--target", f"127.0.0.1:{pointing_server.port}"]
    health = run([agent, "health", *target], tmp_path)
    assert (health.returncode, health.stdout, health.stderr) == (0, "SERVING\n", "")
    shot = tmp_path / "shot.png"
    Image.fromarray(screenshot).save(shot)
    ground = run([agent, "ground", *target, "--token-file", token_file, shot, "the Save button", "--json"], tmp_path)
    assert ground.returncode == 0, ground.stderr
    assert json.loads(ground.stdout)["raw_answer"] == POINTING_ANSWER


@pytest.mark.slow
def test_pixelprune_eval_against_a_service_runs_in_the_client_install(client_venv, pointing_server, token_file,
                                                                      screenshot, tmp_path):
    """`pixelprune eval --target` needs the client extra only: it speaks the gRPC contract itself."""
    from PIL import Image

    Image.fromarray(screenshot).save(tmp_path / "shot.png")  # 1000x700: the answer lands at (642, 222.6)
    (tmp_path / "data.json").write_text(json.dumps([
        {"img_filename": "shot.png", "bbox": [630, 210, 24, 24], "instruction": "the Save button",
         "data_type": "icon", "data_source": "tk"},
        {"img_filename": "shot.png", "bbox": [10, 10, 24, 24], "instruction": "the corner",
         "data_type": "text", "data_source": "tk"}]))
    done = run([client_venv / "bin" / "pixelprune", "eval", tmp_path / "data.json", "--target",
                f"127.0.0.1:{pointing_server.port}", "--token-file", token_file, "--settings", "full,pred2d:max:0",
                "--jsonl", tmp_path / "eval.jsonl"], tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert sorted((r["setting"], r["hit"]) for r in records) == [("full", False), ("full", True),
                                                                 ("pred2d:max:0", False), ("pred2d:max:0", True)]
