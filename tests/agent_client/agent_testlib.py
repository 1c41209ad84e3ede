"""Constants and helpers shared by the agent-client tests and their fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent_client.capture import Monitor

TOKEN = "agent-client-test-token"
POINTING_ANSWER = "(642, 318)"  # the pointing checkpoint's answer: relative 0..1000 coordinates
SCREEN_SIZE = (2560, 1024)
MONITOR_1 = Monitor(index=1, left=0, top=0, width=1280, height=1024)
MONITOR_2 = Monitor(index=2, left=1280, top=128, width=1280, height=768)
WINDOW_TITLE = "PixelPrune agent test window"
WINDOW_GEOMETRY = (1400, 300, 420, 260)  # global x, y, width, height: on monitor 2
WINDOW_RGB = (255, 64, 32)  # its background; channel order matters (mss grabs BGRA)


def need_tool(tool: str, package: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.fail(f"{tool} is not installed (Debian package {package}; .ci/run installs it)")
    return exe


@dataclass(frozen=True)
class XDisplay:
    display: str  # ":N"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a subprocess on this display."""
        return {**os.environ, "DISPLAY": self.display, **extra}

    def run(self, *argv: str) -> str:
        return subprocess.run(argv, env=self.env(), check=True, capture_output=True, text=True,
                              timeout=30).stdout


@contextmanager
def on_display(display: str):
    """Point this process's DISPLAY at `display` for the block."""
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    try:
        yield
    finally:
        if old is None:
            del os.environ["DISPLAY"]
        else:
            os.environ["DISPLAY"] = old


def agent_command() -> list[str]:
    exe = shutil.which("pixelprune-agent")
    if exe is None:
        pytest.fail("pixelprune-agent is not on PATH: pip install -e .")
    return [exe]


def server_config(checkpoint: Path, token_file: Path | None, port: int = 0, extra: tuple[str, ...] = ()):
    """A loopback server's config, built from `pixelprune serve` flags."""
    from service.config import from_args_and_env

    argv = ["--model", str(checkpoint), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "-1", *extra]
    if token_file is not None:
        argv += ["--auth-token-file", str(token_file)]
    return from_args_and_env(argv, {})
