"""Fixtures of the agent-client tests: a real X server (Xvfb) with two monitors and a
real window, and real grounding servers with the tiny checkpoint.

X layout (one 2560x1024 Xvfb screen cut into two RandR 1.5 monitors with
`xrandr --setmonitor`):

    monitor 1 "LEFT"  1280x1024 at (0, 0)     (covers the screen's output)
    monitor 2 "RIGHT" 1280x768  at (1280, 128)

so monitor 2 has a non-zero left AND top offset. Xvfb runs with -noreset: without
it the server resets when its last client disconnects and forgets the monitors.
(Xvfb +xinerama with two screens is no alternative: Xvfb reports both heads at 0,0.)

The tiny checkpoint has random weights and answers blanks, never a point. To test
point mapping and clicks end to end, `pointing_checkpoint` is the same checkpoint
rigged by `pixelprune tiny-checkpoint --answer` (text decoder turned into a fixed
chain of next tokens): whatever the screenshot, the real model emits POINTING_ANSWER
through the real server, parser and coordinate transforms.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent_testlib import (MONITOR_1, MONITOR_2, POINTING_ANSWER, SCREEN_SIZE, TOKEN, WINDOW_GEOMETRY, WINDOW_RGB,
                           WINDOW_TITLE, XDisplay, need_tool, on_display, server_config)

_WINDOW_SCRIPT = """
import sys, tkinter as tk
root = tk.Tk()
root.title(sys.argv[1])
root.geometry(sys.argv[2])
root.configure(bg=sys.argv[3])
tk.Button(root, text="Save", width=12).pack(padx=40, pady=40)
tk.Label(root, text="Click the Save button", bg=sys.argv[3]).pack()
root.mainloop()
"""


def _read_display_number(fd: int, proc: subprocess.Popen, timeout: float = 20.0) -> int:
    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"Xvfb did not start (exit code {proc.poll()})")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            data += os.read(fd, 64)
    return int(data.strip())


@pytest.fixture(scope="session")
def xvfb(tmp_path_factory):
    """A real Xvfb with the two-monitor layout above, checked through mss."""
    exe = need_tool("Xvfb", "xvfb")
    xrandr = need_tool("xrandr", "x11-xserver-utils")
    need_tool("xdotool", "xdotool")
    log = tmp_path_factory.mktemp("xvfb") / "xvfb.log"
    read_fd, write_fd = os.pipe()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([exe, "-displayfd", str(write_fd), "-screen", "0", "%dx%dx24" % SCREEN_SIZE,
                                 "-nolisten", "tcp", "-noreset"], pass_fds=(write_fd,), stdout=log_file,
                                stderr=subprocess.STDOUT)
    os.close(write_fd)
    try:
        x = XDisplay(f":{_read_display_number(read_fd, proc)}")
        os.close(read_fd)
        x.run(xrandr, "--setmonitor", "LEFT", "1280/338x1024/270+0+0", "screen")
        x.run(xrandr, "--setmonitor", "RIGHT", "1280/338x768/203+1280+128", "none")
        from agent_client.capture import monitors

        with on_display(x.display):
            found = monitors()
        assert found[1:] == [MONITOR_1, MONITOR_2], f"mss sees {found}"
        yield x
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def demo_window(xvfb):
    """A real Tk window on monitor 2; yields its X window id."""
    x, y, w, h = WINDOW_GEOMETRY
    if subprocess.run([sys.executable, "-c", "import tkinter"], capture_output=True).returncode != 0:
        pytest.fail(f"{sys.executable} has no tkinter (Debian package python3-tk)")
    proc = subprocess.Popen([sys.executable, "-c", _WINDOW_SCRIPT, WINDOW_TITLE, f"{w}x{h}+{x}+{y}",
                             "#%02x%02x%02x" % WINDOW_RGB], env=xvfb.env())
    try:
        window_id = subprocess.run(["xdotool", "search", "--sync", "--onlyvisible", "--name", WINDOW_TITLE],
                                   env=xvfb.env(), capture_output=True, text=True, timeout=30,
                                   check=True).stdout.split()[0]
        time.sleep(0.3)  # let Tk paint after mapping
        yield window_id
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="session")
def pointing_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint rigged to answer POINTING_ANSWER (`pixelprune tiny-checkpoint --answer`)."""
    from pixelprune.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("pointing") / "checkpoint", seed=0,
                                 answer=POINTING_ANSWER)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    """A factory of engines on one loaded tiny model: each server gets its own (one engine, one loop)."""
    from pixelprune.model.engine import GroundingEngine
    from service.server import load_engine

    config = server_config(tiny_checkpoint, None)
    loaded = load_engine(config)
    return lambda: GroundingEngine(loaded.model, loaded.processor, max_new_tokens=loaded.max_new_tokens,
                                   is_random_weights=loaded.is_random_weights, batch=config.batch)


@pytest.fixture(scope="session")
def grounding_server(tiny_checkpoint, tiny_engine, token_file):
    """A real server with the tiny checkpoint, requiring TOKEN. Yields the handle."""
    from service.server import create_server

    handle = create_server(server_config(tiny_checkpoint, token_file), engine=tiny_engine())
    yield handle
    handle.stop(0)


@pytest.fixture(scope="session")
def pointing_server(pointing_checkpoint, token_file):
    """A real server with the pointing checkpoint, requiring TOKEN."""
    from service.server import create_server

    handle = create_server(server_config(pointing_checkpoint, token_file))
    yield handle
    handle.stop(0)


@pytest.fixture(scope="session")
def tls_server(tiny_checkpoint, tiny_engine, tmp_path_factory):
    """A server with a self-signed certificate for 127.0.0.1 (openssl); yields (handle, cert path)."""
    from service.server import create_server

    openssl, folder = need_tool("openssl", "openssl"), tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    config = server_config(tiny_checkpoint, None, extra=("--tls-cert", str(cert), "--tls-key", str(key)))
    handle = create_server(config, engine=tiny_engine())
    yield handle, cert
    handle.stop(0)


@pytest.fixture(scope="session")
def screenshot(corpus_dir) -> np.ndarray:
    """A 1000x700 crop of a corpus desktop screenshot: real content, sides not multiples
    of 32 (so the model's resize changes them), small enough for a fast CPU answer."""
    from PIL import Image

    with Image.open(corpus_dir / "desktop_pcmanfm_xterm_mousepad_1920x1080.png") as im:
        return np.asarray(im.convert("RGB"))[100:800, 200:1200].copy()
