"""Frame pixels -> global screen coordinates (exact values), and capture and clicking on
a real two-monitor Xvfb."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from agent_client.capture import (ClickError, DisplayError, Monitor, ScreenCapture, click, click_target,
                                  frame_to_global, monitors)
from agent_testlib import MONITOR_1, MONITOR_2, WINDOW_GEOMETRY, WINDOW_RGB, on_display


def pointer(xvfb) -> tuple[int, int]:
    out = xvfb.run("xdotool", "getmouselocation", "--shell")
    values = dict(line.split("=", 1) for line in out.split())
    return int(values["X"]), int(values["Y"])


# --- mapping: exact values -------------------------------------------------------------


def test_offset_monitor_same_size():
    m = Monitor(2, left=1280, top=128, width=1280, height=768)
    assert frame_to_global(100.5, 200.25, m, (1280, 768)) == (1380.5, 328.25)
    assert click_target(100.5, 200.25, m, (1280, 768)) == (1380, 328)
    assert frame_to_global(0.0, 0.0, m, (1280, 768)) == (1280.0, 128.0)


def test_hidpi_scale_two():
    # macOS Retina: mss captures 2880x1800 physical pixels of a 1440x900-point monitor.
    m = Monitor(2, left=1440, top=0, width=1440, height=900)
    assert frame_to_global(1000.0, 501.0, m, (2880, 1800)) == (1940.0, 250.5)
    assert click_target(1000.0, 501.0, m, (2880, 1800)) == (1940, 250)
    assert click_target(2879.0, 1799.0, m, (2880, 1800)) == (2879, 899)


def test_negative_offsets_left_of_and_above_primary():
    m = Monitor(2, left=-1920, top=-200, width=1920, height=1080)
    assert frame_to_global(0.0, 0.0, m, (1920, 1080)) == (-1920.0, -200.0)
    assert frame_to_global(1919.5, 1079.75, m, (1920, 1080)) == (-0.5, 879.75)
    # floor, not truncation towards zero: -0.5 is in pixel -1
    assert click_target(1919.5, 1079.75, m, (1920, 1080)) == (-1, 879)
    assert click_target(10.25, 5.5, Monitor(1, -3840, 0, 1920, 1080), (3840, 2160)) == (-3835, 2)


def test_edge_points_stay_on_the_monitor():
    m = Monitor(2, left=1280, top=128, width=1280, height=768)
    assert click_target(1280.0, 768.0, m, (1280, 768)) == (2559, 895)
    assert click_target(-3.0, -1.0, m, (1280, 768)) == (1280, 128)


def test_mapping_matches_a_slow_reference():
    rng = np.random.default_rng(7)
    for _ in range(200):
        left, top = (int(v) for v in rng.integers(-4000, 4000, 2))
        width, height = (int(v) for v in rng.integers(1, 4000, 2))
        scale = float(rng.choice([1.0, 1.25, 1.5, 2.0]))
        fw, fh = max(1, round(width * scale)), max(1, round(height * scale))
        x, y = float(rng.uniform(0, fw)), float(rng.uniform(0, fh))
        m = Monitor(1, left, top, width, height)
        gx, gy = frame_to_global(x, y, m, (fw, fh))
        # reference: the fraction of the frame is the fraction of the monitor
        assert gx == pytest.approx(left + (x / fw) * width, abs=1e-9)
        assert gy == pytest.approx(top + (y / fh) * height, abs=1e-9)
        cx, cy = click_target(x, y, m, (fw, fh))
        assert left <= cx < left + width and top <= cy < top + height
        assert cx == min(int(np.floor(gx)), left + width - 1)


def test_bad_mapping_input():
    with pytest.raises(ValueError, match="frame size"):
        frame_to_global(1.0, 1.0, MONITOR_2, (0, 768))
    with pytest.raises(ValueError, match="finite"):
        frame_to_global(float("nan"), 1.0, MONITOR_2, (1280, 768))


# --- a real X server -------------------------------------------------------------------


def test_mss_sees_both_monitors(xvfb):
    with on_display(xvfb.display):
        found = monitors()
    assert found[0] == Monitor(0, 0, 0, 2560, 1024)
    assert found[1:] == [MONITOR_1, MONITOR_2]


def test_grab_monitor_two_shows_the_window_at_its_offset(xvfb, demo_window):
    wx, wy, ww, wh = WINDOW_GEOMETRY
    geometry = dict(line.split("=", 1) for line in
                    xvfb.run("xdotool", "getwindowgeometry", "--shell", demo_window).split())
    assert (int(geometry["X"]), int(geometry["Y"])) == (wx, wy)
    with on_display(xvfb.display), ScreenCapture(2) as capture:
        frame = capture.grab()
    assert frame.monitor == MONITOR_2
    assert frame.pixels.shape == (768, 1280, 3) and frame.pixels.dtype == np.uint8
    assert frame.pixels.flags["C_CONTIGUOUS"]
    # the window's corner, global (1400, 300), is frame pixel (1400-1280, 300-128)
    fx, fy = wx - MONITOR_2.left, wy - MONITOR_2.top
    assert tuple(frame.pixels[fy + 2, fx + 2]) == WINDOW_RGB
    assert tuple(frame.pixels[fy + wh - 3, fx + ww - 3]) == WINDOW_RGB
    assert tuple(frame.pixels[fy - 2, fx - 2]) != WINDOW_RGB  # outside: the root window
    # and the mapping sends that frame pixel back to the window's global corner
    assert click_target(fx + 0.5, fy + 0.5, frame.monitor, (1280, 768)) == (wx, wy)


def test_monitor_zero_is_the_whole_screen(xvfb, demo_window):
    with on_display(xvfb.display), ScreenCapture(0) as capture:
        frame = capture.grab()
    assert frame.pixels.shape == (1024, 2560, 3)
    wx, wy = WINDOW_GEOMETRY[:2]
    assert tuple(frame.pixels[wy + 2, wx + 2]) == WINDOW_RGB


def test_unknown_monitor_is_a_one_line_error(xvfb):
    with on_display(xvfb.display), pytest.raises(DisplayError) as info:
        ScreenCapture(3)
    assert str(info.value).startswith("no monitor 3; available: 0: 2560x1024+0+0, 1: 1280x1024+0+0, "
                                      "2: 1280x768+1280+128")
    assert "\n" not in str(info.value)


def test_missing_display_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(DisplayError, match="DISPLAY is not set") as info:
        ScreenCapture(1)
    assert "\n" not in str(info.value)
    with pytest.raises(DisplayError):
        click(10, 10)


def test_unreachable_display_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":4093")  # nothing listens there
    with pytest.raises(DisplayError, match="cannot open the display ':4093'") as info:
        ScreenCapture(1)
    assert "\n" not in str(info.value)


def test_click_moves_the_pointer(xvfb, demo_window, monkeypatch):
    monkeypatch.setenv("DISPLAY", xvfb.display)
    click(1500, 400)
    assert pointer(xvfb) == (1500, 400)
    click(2559, 895)  # the last pixel of monitor 2
    assert pointer(xvfb) == (2559, 895)


def test_click_is_refused_on_other_platforms(monkeypatch):
    monkeypatch.setattr("agent_client.capture.sys.platform", "darwin")
    with pytest.raises(ClickError, match="macOS: use pyautogui"):
        click(1, 1)
    monkeypatch.setattr("agent_client.capture.sys.platform", "win32")
    with pytest.raises(ClickError, match="Windows: use pyautogui"):
        click(1, 1)


def test_xdotool_missing_is_a_clear_error(xvfb, monkeypatch):
    monkeypatch.setenv("DISPLAY", xvfb.display)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ClickError, match="Debian package xdotool"):
        click(1, 1)


def test_missing_mss_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setitem(sys.modules, "mss", None)  # `import mss` now raises ImportError
    with pytest.raises(DisplayError, match=r"^screen capture needs mss: pip install 'pixelprune\[client\]'$"):
        monitors()
