"""Live screen capture with mss, and the way back from a frame's pixels to the screen.

The point the service returns is in the pixels of the frame as sent. To act on it
an agent needs GLOBAL screen coordinates, which differ from frame pixels by

* the monitor's offset: mss `monitors[N]` (N >= 1) has `left`/`top` in the global
  (virtual) screen, which are non-zero for every monitor but the first and
  negative for a monitor left of or above the primary; `monitors[0]` is the
  bounding box of all monitors;
* the scale: on HiDPI displays (macOS Retina, Windows scaling when the process is
  DPI-unaware) the captured image has more pixels than the monitor's logical
  size, in which the pointer is positioned. scale = logical size / frame size.

So  global = (left + x * width / frame_width,  top + y * height / frame_height),
with (x, y) continuous frame pixels (0 = the left/top edge of the frame). The
pixel to click is the floor of that, clamped into the monitor. Getting any of
these wrong is the classic "clicks land in the wrong place" bug of GUI agents.

Clicking is implemented for X11 with `xdotool` (Debian package xdotool). On
macOS use pyautogui or Quartz (`CGEventCreateMouseEvent` + `CGEventPost`, in
logical points); on Windows pyautogui or `SetCursorPos` + `SendInput` (call
`SetProcessDpiAwareness` first so coordinates are physical pixels); on Wayland
the compositor decides (e.g. `ydotool`). Those are not implemented here and
raise `ClickError` with that advice.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

CLICK_TIMEOUT_S = 10.0  # an xdotool call that takes longer is reported as a failure


class DisplayError(Exception):
    """No screen to capture (no DISPLAY, X server unreachable, bad monitor index); one line."""


class ClickError(Exception):
    """The click could not be performed on this platform; one line."""


@dataclass(frozen=True)
class Monitor:
    """One mss monitor rectangle in global screen coordinates (logical pixels)."""

    index: int  # mss monitors[index]; 0 = all monitors together
    left: int  # global x of the monitor's left edge (negative left of the primary)
    top: int  # global y of the monitor's top edge
    width: int  # logical width
    height: int  # logical height


@dataclass(frozen=True)
class CapturedFrame:
    """One grabbed frame and where it came from."""

    pixels: np.ndarray  # uint8 (H, W, 3) RGB, C-contiguous
    monitor: Monitor  # the monitor it shows
    captured_at: float  # time.monotonic() at the grab, seconds


def frame_to_global(x: float, y: float, monitor: Monitor, frame_size: tuple[int, int]) -> tuple[float, float]:
    """A point in frame pixels -> global screen coordinates (continuous).

    frame_size is the captured image's (width, height); it differs from the
    monitor's logical size on HiDPI screens."""
    frame_w, frame_h = frame_size
    if frame_w <= 0 or frame_h <= 0:
        raise ValueError(f"frame size must be positive, got {frame_size}")
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"point must be finite, got ({x}, {y})")
    # scale first: exactly 1.0 when the frame has the monitor's size, so no rounding is added
    scale_x, scale_y = monitor.width / frame_w, monitor.height / frame_h
    return monitor.left + x * scale_x, monitor.top + y * scale_y


def click_target(x: float, y: float, monitor: Monitor, frame_size: tuple[int, int]) -> tuple[int, int]:
    """The global pixel to click for a frame point: floor of `frame_to_global`, clamped
    into the monitor so that an edge point (x == frame width) stays on it."""
    gx, gy = frame_to_global(x, y, monitor, frame_size)
    px = min(max(math.floor(gx), monitor.left), monitor.left + monitor.width - 1)
    py = min(max(math.floor(gy), monitor.top), monitor.top + monitor.height - 1)
    return px, py


def _check_display() -> None:
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        hint = " (a Wayland session: run under XWayland)" if os.environ.get("WAYLAND_DISPLAY") else ""
        raise DisplayError(f"no X display: DISPLAY is not set{hint}; start Xvfb or run inside a desktop session")


def _open_mss():
    """(an open mss instance, its monitor list, its error type) on the current display.

    mss is the optional extra `client`, imported where it is needed; no mss, no DISPLAY or a
    display that does not open -> DisplayError with one line."""
    _check_display()
    try:
        import mss
        from mss.exception import ScreenShotError
    except ImportError:
        raise DisplayError("screen capture needs mss: pip install 'pixelprune[client]'") from None
    try:
        sct = mss.MSS() if hasattr(mss, "MSS") else mss.mss()
        return sct, sct.monitors, ScreenShotError
    except ScreenShotError as exc:
        raise DisplayError(f"cannot open the display {os.environ.get('DISPLAY', '')!r}: "
                           f"{' '.join(str(exc).split())}") from None


def _as_monitor(index: int, m: dict) -> Monitor:
    """A Monitor from one entry of mss's monitor list."""
    return Monitor(index, int(m["left"]), int(m["top"]), int(m["width"]), int(m["height"]))


class ScreenCapture:
    """Grabs frames of one monitor with mss. Use as a context manager.

    monitor: mss index, 1.. for one monitor, 0 for all of them together."""

    def __init__(self, monitor: int = 1):
        self._sct, monitors, self._error_type = _open_mss()
        if not isinstance(monitor, int) or not 0 <= monitor < len(monitors):
            self._sct.close()
            listed = ", ".join(f"{i}: {m['width']}x{m['height']}{m['left']:+d}{m['top']:+d}"
                               for i, m in enumerate(monitors))
            raise DisplayError(f"no monitor {monitor}; available: {listed}")
        self.monitor = _as_monitor(monitor, monitors[monitor])

    def __enter__(self) -> ScreenCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sct.close()

    def grab(self) -> CapturedFrame:
        """One frame of the monitor as uint8 RGB (mss gives BGRA; alpha is dropped)."""
        m = self.monitor
        try:
            shot = self._sct.grab({"left": m.left, "top": m.top, "width": m.width, "height": m.height})
        except self._error_type as exc:
            raise DisplayError(f"screen capture failed: {' '.join(str(exc).split())}") from None
        bgra = np.frombuffer(shot.bgra, dtype=np.uint8).reshape(shot.height, shot.width, 4)
        return CapturedFrame(np.ascontiguousarray(bgra[:, :, 2::-1]), m, time.monotonic())


def monitors() -> list[Monitor]:
    """All mss monitors (index 0 = the union, then each monitor)."""
    sct, listed, _ = _open_mss()
    with sct:
        return [_as_monitor(i, m) for i, m in enumerate(listed)]


def click(x: int, y: int, button: int = 1) -> None:
    """Move the pointer to global (x, y) and click. X11 only (xdotool); see the module
    docstring for macOS / Windows / Wayland."""
    if sys.platform == "darwin":
        raise ClickError("clicking is not implemented on macOS: use pyautogui or Quartz CGEventPost")
    if sys.platform.startswith("win"):
        raise ClickError("clicking is not implemented on Windows: use pyautogui or SetCursorPos + SendInput")
    _check_display()
    exe = shutil.which("xdotool")
    if exe is None:
        raise ClickError("xdotool is not installed (Debian package xdotool); it performs the click on X11")
    # No --sync: it can wait forever for a motion event; the X server runs the warp and
    # the click in order anyway.
    try:
        done = subprocess.run([exe, "mousemove", str(int(x)), str(int(y)), "click", str(int(button))],
                              capture_output=True, text=True, timeout=CLICK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ClickError(f"xdotool did not finish within {CLICK_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        raise ClickError(f"xdotool failed: {' '.join(done.stderr.split()) or f'exit {done.returncode}'}")
