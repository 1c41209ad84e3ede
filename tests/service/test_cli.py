"""`pixelprune serve` reports bad settings and a wrong --model as one line and exit status 2, a
model that cannot be fetched or loaded as one line and 1 (no traceback, no retries); its help
shows the flags in groups."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from net_testlib import free_port
from pixelprune.cli import main
from pixelprune.model.checkpoint import OFFLINE_HINT
from service.config import HELP_GROUPS, OTHER_GROUP, ServiceConfig, _OPTIONS, _SWITCHES, configure

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ServiceConfig().spec.model


def serve_process(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m pixelprune.cli serve ...` (the dispatcher run as __main__) from `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pixelprune.cli", "serve", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_flag_value(capsys):
    assert main(["serve", "--queue-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "pixelprune serve: error: --queue-size must be >= 1, got 0"


def test_bad_environment(capsys, monkeypatch):
    monkeypatch.setenv("PIXELPRUNE_PRUNE_METHOD", "zigzag")
    assert main(["serve"]) == 2
    assert "--prune-method: unknown pruning method 'zigzag'; expected one of raster, serpentine, pred2d" \
        in capsys.readouterr().err


def test_bad_token_file_is_reported_before_the_model_loads(capsys, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice tok-a\nbob\n")
    assert main(["serve", "--model", str(tmp_path / "nothing-here"), "--auth-token-file", str(tokens)]) == 2
    assert capsys.readouterr().err.strip() == (f"pixelprune serve: error: --auth-token-file {tokens} line 2: must "
                                               f"be `TENANT TOKEN` (then an optional # comment), got 1 field(s)")


@pytest.mark.parametrize("model, message", [
    ("/nonexistent", "no such checkpoint directory: /nonexistent"),
    ("./tiny-qwen3", "no such checkpoint directory: ./tiny-qwen3"),  # a typo of ./tiny-qwen3vl
    ("~/no-such-checkpoint-here", "no such checkpoint directory: ~/no-such-checkpoint-here"),
    ("tiny-qwen3vl/", "no such checkpoint directory: tiny-qwen3vl/"),  # no hub id ends with a slash
    ("notes.txt", "no such checkpoint directory: notes.txt"),  # exists, but is a file
    ("empty", "empty is not a checkpoint (no config.json)"),
])
def test_a_wrong_model_path_is_one_line(tmp_path, monkeypatch, capsys, model, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--model", model, "--metrics-port", "-1"]) == 2
    assert capsys.readouterr().err == f"pixelprune serve: error: {message}\n"


def test_no_model_offline_names_the_default_and_tiny_checkpoint_at_once(tmp_path):
    started = time.monotonic()
    done = serve_process(cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert time.monotonic() - started < 30  # no retries (the loader took ~30 s to give up)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"pixelprune serve: error: cannot fetch model {DEFAULT_MODEL}: it is not in the local "
                           f"Hugging Face cache and HF_HUB_OFFLINE is set; {OFFLINE_HINT}\n")


def test_an_unreachable_hub_is_asked_once(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: the connection is refused
    started = time.monotonic()
    done = serve_process("--model", "Qwen/Qwen3-VL-8B-Instruct", cwd=tmp_path,
                         env={"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
                              "TRANSFORMERS_OFFLINE": "0"})
    assert time.monotonic() - started < 30
    assert (done.returncode, done.stdout) == (1, "")
    match = re.fullmatch(r"pixelprune serve: error: cannot fetch model Qwen/Qwen3-VL-8B-Instruct: it is not in the "
                         r"local Hugging Face cache and (\S+) cannot be reached \((\w+): (.+)\); (.+)\n", done.stderr)
    assert match, done.stderr
    assert match[1] == endpoint and match[4] == OFFLINE_HINT


def test_a_checkpoint_that_cannot_load_is_one_line_even_as_main(tmp_path):
    """The dispatcher run as `python -m pixelprune.cli`: an error raised by `serve` is still
    one line (when serve imported its error type back from the dispatcher, this one escaped
    as a traceback: __main__ is a second copy of that module)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    done = serve_process("--model", str(broken), "--device", "cpu", "--metrics-port", "-1", cwd=tmp_path, timeout=300)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"pixelprune serve: error: cannot load model {broken}: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_help_shows_every_option_in_exactly_one_group():
    grouped = [field for _description, fields in HELP_GROUPS.values() for field in fields]
    options = [field for field, *_ in _OPTIONS] + ["no_prune"] + [field for field, *_ in _SWITCHES]
    assert sorted(grouped) == sorted(options)  # each once: no option left out, none twice, none unknown
    assert list(HELP_GROUPS) == ["model", "batching and caches", "limits and admission", "sessions",
                                 "network and TLS", "health and drain", "metrics and logs"]
    assert DEFAULT_MODEL in HELP_GROUPS["model"][0]  # the help says which model runs by default


def test_help_lists_the_flags_under_their_group(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert OTHER_GROUP not in text and "default None" not in text and "[env" not in text
    titles = [text.index(f"\n{title}:\n") for title in HELP_GROUPS]
    assert titles == sorted(titles)
    for (title, (_description, fields)), start, end in zip(HELP_GROUPS.items(), titles, titles[1:] + [len(text)]):
        section = text[start:end]
        for field, flag, *_ in _OPTIONS + [("no_prune", "--no-prune")] + _SWITCHES:
            assert (f"  {flag}" in section) == (field in fields), (title, flag)


def test_help_shows_defaults_in_one_style():
    import argparse

    from service.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    assert helps["--redis-url"] == "Redis URL for sessions (absent = in-process store; default none; env " \
                                   "PIXELPRUNE_REDIS_URL)"
    assert helps["--queue-size"] == "requests waiting for the model before RESOURCE_EXHAUSTED (default 16; env " \
                                    "PIXELPRUNE_QUEUE_SIZE)"
    assert helps["--prune-tau"] == "default tau in [0, 1] (0 = lossless; default 0; env PIXELPRUNE_PRUNE_TAU)"
    assert helps["--no-prune"] == "run the model on every block by default (default off; env PIXELPRUNE_NO_PRUNE)"
    assert helps["--model"] == f"hub id or local checkpoint directory (default {DEFAULT_MODEL}; env PIXELPRUNE_MODEL)"


@pytest.mark.parametrize("which", ["port", "metrics_port", "health_port"])
def test_busy_ports(engine, which):
    from service.server import create_server

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = {"port": 0, "metrics_port": 0, "health_port": 0, which: taken}
        config = configure(model="tiny", host="127.0.0.1", **ports)
        expected = {"port": "cannot bind gRPC to", "metrics_port": "cannot serve metrics on",
                    "health_port": "cannot bind the health server to"}[which]
        with pytest.raises(ValueError, match=f"{expected} 127.0.0.1:{taken}"):
            create_server(config, engine=engine, warmup=False)
