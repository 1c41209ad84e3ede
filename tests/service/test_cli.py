"""`pixelprune serve` reports bad settings as one line and exit code 2 (no traceback)."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from pixelprune.cli import main
from service.config import ServiceConfig


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


def test_missing_model(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "nothing-here"), "--device", "cpu", "--metrics-port", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pixelprune serve: error: cannot load model") and "Traceback" not in "".join(err)


@pytest.mark.parametrize("which", ["port", "metrics_port", "health_port"])
def test_busy_ports(engine, which):
    from service.server import create_server

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = {"port": 0, "metrics_port": 0, "health_port": 0, which: taken}
        config = dataclasses.replace(ServiceConfig(), model="tiny", host="127.0.0.1", **ports)
        expected = {"port": "cannot bind gRPC to", "metrics_port": "cannot serve metrics on",
                    "health_port": "cannot bind the health server to"}[which]
        with pytest.raises(ValueError, match=f"{expected} 127.0.0.1:{taken}"):
            create_server(config, engine=engine, warmup=False)
