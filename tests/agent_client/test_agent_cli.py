"""`pixelprune-agent ground` and `live` as processes, against real servers and a real
two-monitor Xvfb. Errors are one line; exit status 1 when running fails (server, token,
display), 2 when the command line is wrong (a missing or unreadable file, a bad value)."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from agent_client.capture import ScreenCapture
from agent_client.cli import POINT_RADIUS, annotate_frame
from agent_client.messages import GroundResult
from agent_testlib import MONITOR_2, agent_command, on_display
from net_testlib import free_port
from pixelprune.geometry import resize_to
from pixelprune.keepmask import pack_keep, unpack_keep
from pixelprune.show import render_keep
from pixelprune_api.grounding.v1 import grounding_pb2 as pb

POINT_2 = (0.642 * MONITOR_2.width, 0.318 * MONITOR_2.height)  # the pointing model's answer on monitor 2


def agent(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(agent_command() + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else dict(os.environ))


def connection(server, token_file) -> list[str]:
    return ["--target", f"127.0.0.1:{server.port}", "--token-file", str(token_file)]


@pytest.fixture(scope="module")
def screenshot_png(screenshot, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "shot.png"
    Image.fromarray(screenshot).save(path)
    return path


def one_line_error(done: subprocess.CompletedProcess, prefix: str, status: int = 1) -> str:
    assert done.returncode == status, done.stderr
    assert done.stdout == ""
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, done.stderr
    assert message.startswith(prefix), message
    return message


# --- ground ----------------------------------------------------------------------------


def test_ground_json(pointing_server, token_file, screenshot_png):
    done = agent("ground", *connection(pointing_server, token_file), str(screenshot_png),
                 "click the Save button", "--json", "--session", "cli-ground-1")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    for key in ("point", "retain_ratio", "kept_blocks", "total_blocks", "cache_hit", "changed_fraction", "ttft_ms"):
        assert key in answer
    assert answer["point"] == pytest.approx({"x": 642.0, "y": 222.6})  # "(642, 318)" of a 1000x700 image
    assert (answer["kept_blocks"], answer["total_blocks"]) == (540, 682)
    assert answer["retain_ratio"] == pytest.approx(540 / 682)
    assert answer["changed_fraction"] == 1.0 and answer["cache_hit"] is False and answer["ttft_ms"] > 0
    assert answer["random_weights"] is True and answer["session_id"] == "cli-ground-1"
    again = json.loads(agent("ground", *connection(pointing_server, token_file), str(screenshot_png),
                             "click the Save button", "--json", "--session", "cli-ground-1").stdout)
    assert again["cache_hit"] is True and again["changed_fraction"] == 0.0 and again["point"] == answer["point"]


def test_ground_readable_line_says_random_weights(grounding_server, token_file, screenshot_png):
    done = agent("ground", *connection(grounding_server, token_file), str(screenshot_png), "open the terminal",
                 "--no-prune")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "\n" not in line
    assert line.startswith("no point in the answer")  # the plain tiny checkpoint answers blanks
    assert "retain 100.0% (682/682 blocks)" in line and "RANDOM WEIGHTS" in line
    fields = line.split(" | ")  # no empty field: without a session there is no "session" part
    assert all(field.strip() for field in fields) and not any(f.startswith("session") for f in fields), line
    named = agent("ground", *connection(grounding_server, token_file), str(screenshot_png), "open the terminal",
                  "--no-prune", "--session", "readable-1").stdout.strip().split(" | ")
    assert "session readable-1" in named and len(named) == len(fields) + 1


def test_ground_over_tls(tls_server, screenshot_png):
    handle, cert = tls_server
    done = agent("ground", "--target", f"127.0.0.1:{handle.port}", "--tls-ca", str(cert), str(screenshot_png),
                 "click", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total_blocks"] == 682
    done = agent("ground", "--target", f"127.0.0.1:{handle.port}", str(screenshot_png), "click")
    one_line_error(done, "pixelprune-agent ground: error: cannot reach the grounding server")


def test_ground_unreachable_server(screenshot_png):
    done = agent("ground", "--target", f"127.0.0.1:{free_port()}", str(screenshot_png), "click")
    one_line_error(done, "pixelprune-agent ground: error: cannot reach the grounding server at 127.0.0.1:")


def test_ground_bad_token(grounding_server, screenshot_png, tmp_path):
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token\n")
    done = agent("ground", "--target", f"127.0.0.1:{grounding_server.port}", "--token-file", str(bad),
                 str(screenshot_png), "click")
    one_line_error(done, "pixelprune-agent ground: error: the server at")
    assert "(a bad token)" in done.stderr
    done = agent("ground", "--target", f"127.0.0.1:{grounding_server.port}", str(screenshot_png), "click")
    assert "(no token given)" in one_line_error(done, "pixelprune-agent ground: error:")


def test_ground_missing_file(grounding_server, token_file, tmp_path):
    missing = tmp_path / "nope.png"
    done = agent("ground", *connection(grounding_server, token_file), str(missing), "click")
    assert one_line_error(done, "", status=2) == f"pixelprune-agent ground: error: {missing}: no such file or directory"


def test_ground_a_file_that_is_no_image(grounding_server, token_file, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("buy milk\n")
    done = agent("ground", *connection(grounding_server, token_file), str(notes), "click")
    assert one_line_error(done, "", status=2) == (f"pixelprune-agent ground: error: {notes}: not an image file (PNG, "
                                                  "JPEG, WebP or another format Pillow reads)")


def test_ground_usage_errors(tmp_path):
    done = agent("ground", "--target", "127.0.0.1:1", "x.png")
    assert one_line_error(done, "", status=2) == ("pixelprune-agent ground: error: the following arguments are "
                                                  "required: INSTRUCTION (see pixelprune-agent ground --help)")
    empty = tmp_path / "token"
    empty.write_text("\n")
    done = agent("ground", "--target", "127.0.0.1:1", "--token-file", str(empty), "x.png", "click")
    assert one_line_error(done, "", status=2) == f"pixelprune-agent ground: error: --token-file {empty} is empty"


# --- live ------------------------------------------------------------------------------


def blocks_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per 32x32 block: are the block interiors (away from grid lines) identical?"""
    h, w = a.shape[0] // 32, a.shape[1] // 32
    inner = lambda img: img.reshape(h, 32, w, 32, 3)[:, 3:29, :, 3:29]  # noqa: E731
    return (inner(a) == inner(b)).all(axis=(1, 3, 4))


def server_keep(answer: dict) -> np.ndarray:
    """The keep mask of a `--json` answer."""
    m = answer["keep_mask"]
    return unpack_keep(m["rows"], m["cols"], base64.b64decode(m["bits"]))


def check_annotation(image: np.ndarray, model_pixels: np.ndarray, keep: np.ndarray, caption: str,
                     point: tuple[float, float] | None, show_ratio: bool = True) -> None:
    """`image` is exactly pixelprune.show.render_keep(model_pixels, keep, caption) but for the point
    marker: the model image at the top, its label in a strip below; and, independently of
    render_keep, every block of the model image that the marker does not touch is drawn as it is
    where `keep` is True and dimmed where it is False (the label covers none of them)."""
    expected = np.asarray(render_keep(model_pixels, keep, caption=caption, show_ratio=show_ratio))
    height, width = model_pixels.shape[:2]
    assert image.shape[1] == width and image.shape[0] > height  # the label strip below the model image
    marker = np.zeros(image.shape[:2], dtype=bool)
    if point is not None:
        reach = 2 * POINT_RADIUS + 3  # crosshair arms plus half the halo's width
        x, y = round(point[0]), round(point[1])
        marker[max(0, y - reach):y + reach + 1, max(0, x - reach):x + reach + 1] = True
    differs = (image != expected).any(axis=2)
    assert differs.any() == (point is not None) and not (differs & ~marker).any()
    h, w = keep.shape
    free = ~marker[:height].reshape(h, 32, w, 32).any(axis=(1, 3))
    assert free.sum() >= keep.size - (9 if point is not None else 0)
    assert np.array_equal(blocks_equal(image[:height], model_pixels)[free], keep[free])


def test_live_on_monitor_two(pointing_server, token_file, xvfb, demo_window, tmp_path):
    from pixelprune.selectors import select_blocks

    out = tmp_path / "annotated"
    frames = 3
    done = agent("live", *connection(pointing_server, token_file), "--instruction", "click the Save button",
                 "--monitor", "2", "--fps", "2", "--frames", str(frames), "--click", "--annotate", str(out),
                 "--json", env=xvfb.env())
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) >= 1
    assert len(answers) + sum(a["skipped_frames"] for a in answers) == frames
    assert f"frames sent {frames}, answers {len(answers)}" in done.stderr
    assert len({a["session_id"] for a in answers}) == 1
    assert [a["sequence"] for a in answers][-1] == frames

    with on_display(xvfb.display), ScreenCapture(2) as capture:
        screen = capture.grab().pixels  # the screen is static: what live captured
    for a in answers:
        assert a["monitor"] == {"index": 2, "left": 1280, "top": 128, "width": 1280, "height": 768}
        assert a["frame_size"] == {"width": 1280, "height": 768}
        # the server saw monitor 2's pixels: its keep mask is the selector's on this capture
        keep = server_keep(a)
        assert np.array_equal(keep, select_blocks(screen))
        assert (a["kept_blocks"], a["total_blocks"]) == (int(keep.sum()), keep.size)
        x, y = a["point"]["x"], a["point"]["y"]
        assert (x, y) == pytest.approx(POINT_2)
        # the mapping, from the answer's own frame point and monitor 2's offset (scale 1 on X11)
        assert (a["global_point"]["x"], a["global_point"]["y"]) == (1280 + x, 128 + y)
        assert (a["click"]["x"], a["click"]["y"]) == (math.floor(1280 + x), math.floor(128 + y))
        assert a["clicked"] is True

        image = np.asarray(Image.open(a["annotation"]).convert("RGB"))
        assert image.shape[1:] == screen.shape[1:] and image.shape[0] > screen.shape[0]  # no resize; label below
        # exactly the blocks the server kept, drawn as they are; the pruned ones dimmed
        check_annotation(image, screen, keep, f"frame {a['sequence']}", (x, y))
        marker = image[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2].reshape(-1, 3)
        assert any(tuple(p) == (230, 30, 40) for p in marker)
    assert sorted(p.name for p in out.iterdir()) == [f"frame-{a['sequence']:06d}.png" for a in answers]

    location = dict(line.split("=", 1) for line in xvfb.run("xdotool", "getmouselocation", "--shell").split())
    last = answers[-1]["click"]
    assert (int(location["X"]), int(location["Y"])) == (last["x"], last["y"])


def test_live_readable_lines(pointing_server, token_file, xvfb, demo_window):
    done = agent("live", *connection(pointing_server, token_file), "--instruction", "click the Save button",
                 "--monitor", "2", "--frames", "1", env=xvfb.env())
    assert done.returncode == 0, done.stderr
    x, y = POINT_2
    assert done.stdout.startswith(f"frame 1: point ({x:.1f}, {y:.1f}) px -> global ({1280 + x:.1f}, "
                                  f"{128 + y:.1f}) click ({math.floor(1280 + x)}, {math.floor(128 + y)}) | retain ")
    assert "skipped 0" in done.stdout and "clicked" not in done.stdout
    assert "RANDOM WEIGHTS" in done.stderr


def test_live_missing_display(grounding_server, token_file):
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    done = agent("live", *connection(grounding_server, token_file), "--instruction", "x", env=env)
    one_line_error(done, "pixelprune-agent live: error: no X display: DISPLAY is not set")


def test_live_unreachable_server(xvfb):
    done = agent("live", "--target", f"127.0.0.1:{free_port()}", "--instruction", "x", "--frames", "2",
                 env=xvfb.env())
    one_line_error(done, "pixelprune-agent live: error: cannot reach the grounding server at 127.0.0.1:")


def test_live_bad_token(grounding_server, xvfb, tmp_path):
    bad = tmp_path / "bad-token"
    bad.write_text("nope\n")
    done = agent("live", "--target", f"127.0.0.1:{grounding_server.port}", "--token-file", str(bad),
                 "--instruction", "x", "--frames", "2", env=xvfb.env())
    assert "(a bad token)" in one_line_error(done, "pixelprune-agent live: error: the server at")


def test_live_unknown_monitor(grounding_server, token_file, xvfb):
    done = agent("live", *connection(grounding_server, token_file), "--instruction", "x", "--monitor", "7",
                 env=xvfb.env())
    one_line_error(done, "pixelprune-agent live: error: no monitor 7; available: 0: 2560x1024+0+0")


# --- annotate_frame (no server) --------------------------------------------------------


def result_with(keep: np.ndarray | None, point: tuple[float, float] | None, sequence: int) -> GroundResult:
    """An answer on the 1000x700 `screenshot` (model size 992x704, 22 x 31 blocks), as received."""
    r = pb.GroundResponse(found=point is not None, image_width=1000, image_height=700, model_width=992,
                          model_height=704, sequence=sequence)
    if point is not None:
        r.point.x, r.point.y = point
    if keep is not None:
        rows, cols, bits = pack_keep(keep)
        r.keep_mask.CopyFrom(pb.KeepMask(rows=rows, cols=cols, bits=bits))
    return GroundResult.from_pb(r)


def test_annotate_draws_the_servers_mask_at_the_model_size(screenshot):
    keep = np.indices((22, 31)).sum(axis=0) % 3 != 0  # a pattern no selector gives: drawn as received
    image = np.asarray(annotate_frame(screenshot, result_with(keep, (500.0, 350.0), sequence=7)))
    assert image.shape[1:] == (992, 3) and image.shape[0] > 704  # the model size, and the label below
    check_annotation(image, resize_to(screenshot, 704, 992), keep, "frame 7", (500 * 992 / 1000, 350 * 704 / 700))


def test_annotate_without_a_mask_dims_nothing(screenshot):
    image = np.asarray(annotate_frame(screenshot, result_with(None, None, sequence=3)))
    check_annotation(image, resize_to(screenshot, 704, 992), np.ones((22, 31), dtype=bool),
                     "frame 3: no keep mask from the server", None, show_ratio=False)
