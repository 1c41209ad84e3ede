"""`pixelprune-agent`: ground one screenshot, watch a live screen, or ask whether a server serves.

    pixelprune-agent ground --target HOST:PORT IMAGE "INSTRUCTION" [--json]
    pixelprune-agent live --target HOST:PORT --instruction "..." [--monitor N] [--fps 2]
                          [--frames K] [--click] [--annotate DIR] [--json]
    pixelprune-agent health --target HOST:PORT [--service NAME]

`live` captures one monitor with mss, streams the frames in one session, and for
every answer prints the frame's sequence number, the point in frame pixels, the
same point in GLOBAL screen coordinates (monitor offset and HiDPI scale applied,
see agent_client.capture), the retain ratio, cache hit, TTFT and skipped frames.
With --json every answer is one JSON object per line. --annotate saves each
answered frame at the model's size with the blocks the server pruned dimmed (the
keep mask of the response: what the model saw, not a guess made here). `health`
prints the grpc.health.v1 status and exits 0 only for SERVING. Every command
takes --tls / --tls-ca and --token-file. Errors print one line,
`pixelprune-agent CMD: error: ...`; exit status 2 for a wrong command line, 1 for a
failure while running (unreachable server, refused token, no display), as
pixelprune.cli_common defines.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from agent_client.capture import CapturedFrame, ClickError, DisplayError, ScreenCapture, click, click_target, \
    frame_to_global
from agent_client.client import GroundingClient
from agent_client.messages import GroundingError, GroundResult
from pixelprune.cli_common import EXIT_INTERRUPTED, EXIT_RUNTIME, OneLineParser, report, with_default
from pixelprune.geometry import BLOCK_SIZE, resize_to, smart_resize
from pixelprune.show import render_keep

HEALTH_TIMEOUT_S = 5.0  # a health check's deadline: a probe, not a request that waits for the model
POINT_RADIUS = 12  # px of the annotation's circle around the answer's point
RANDOM_WEIGHTS_NOTE = "the served model has RANDOM WEIGHTS (a test checkpoint): its points mean nothing"


def _add_channel_arguments(p: argparse.ArgumentParser, timeout: float, timeout_help: str) -> None:
    """Where the server is and how to reach it: the same for every command (and `pixelprune eval --target`)."""
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="the grounding server")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("--tls-ca", metavar="FILE", help="PEM root certificate(s): use TLS and trust these")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--timeout", type=float, default=timeout, metavar="S", help=with_default(timeout_help, timeout))


def _add_request_arguments(p: argparse.ArgumentParser) -> None:
    _add_channel_arguments(p, 30.0, "deadline of one ground request incl. retries, seconds (streams have none)")
    p.add_argument("--session", metavar="ID", help="session id (reuses unchanged frames across calls)")
    p.add_argument("--method", choices=("pred2d", "raster", "serpentine"),
                   help=with_default("pruning scan order", "the server's"))
    p.add_argument("--metric", choices=("max", "mae"), help=with_default("pruning block distance", "the server's"))
    p.add_argument("--tau", type=float, help=with_default("pruning threshold in [0, 1] (0 = lossless)", "the server's"))
    p.add_argument("--no-prune", action="store_true", help="let the model see every block")
    p.add_argument("--json", action="store_true", help="print JSON (one object per answer)")
    p.add_argument("--frame-encoding", choices=("png", "raw"), default="png",
                   help=with_default("how pixels travel: png (level 1, ~20x smaller) or raw RGB (no encoding cost; "
                                     "faster on loopback)", "png"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pixelprune-agent", description="client of the PixelPrune grounding service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("ground", help="ground an instruction on one screenshot")
    g.add_argument("image", metavar="IMAGE", help="screenshot file (PNG/JPEG/WebP sent as is; others re-encoded)")
    g.add_argument("instruction", metavar="INSTRUCTION", help='what to find, e.g. "click the Save button"')
    _add_request_arguments(g)
    g.set_defaults(run=run_ground)
    live = sub.add_parser("live", help="stream a monitor and ground an instruction on every frame")
    live.add_argument("--instruction", required=True, help="what to find on the screen")
    live.add_argument("--monitor", type=int, default=1,
                      help=with_default("mss monitor index: 1.. one monitor, 0 all", 1))
    live.add_argument("--fps", type=float, default=2.0, help=with_default("frames captured per second", 2.0))
    live.add_argument("--frames", type=int, default=0, help=with_default("stop after K frames (0 = until Ctrl-C)", 0))
    live.add_argument("--click", action="store_true", help="click each answer's point (X11: xdotool)")
    live.add_argument("--annotate", metavar="DIR",
                      help="save each answered frame with its point and the blocks the server pruned dimmed")
    _add_request_arguments(live)
    live.set_defaults(run=run_live)
    health = sub.add_parser("health", help="print the server's health status (grpc.health.v1); exit 0 only when "
                                           "SERVING")
    _add_channel_arguments(health, HEALTH_TIMEOUT_S, "deadline of the check, seconds")
    health.add_argument("--service", default="", metavar="NAME",
                        help=with_default("the service whose status to ask, e.g. pixelprune.grounding.v1.Grounding",
                                          "'', the server as a whole"))
    health.set_defaults(run=run_health)
    return parser


def _client(args: argparse.Namespace) -> GroundingClient:
    token = None
    if args.token_file:
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
    tls = Path(args.tls_ca) if args.tls_ca else (True if args.tls else None)
    if args.timeout <= 0:
        raise ValueError("--timeout must be > 0")
    return GroundingClient(args.target, token=token, tls=tls, timeout=args.timeout,
                           frame_encoding=getattr(args, "frame_encoding", "png"))


def _pruning(args: argparse.Namespace) -> dict:
    return {"method": args.method, "metric": args.metric, "tau": args.tau, "prune": not args.no_prune}


def describe(result: GroundResult) -> str:
    """One readable line for a ground answer."""
    w, h = result.image_size
    where = (f"point ({result.point[0]:.1f}, {result.point[1]:.1f}) px of {w}x{h}" if result.point is not None
             else f"no point in the answer {result.raw_answer[:80]!r}")
    parts = [where, f"retain {100 * result.retain_ratio:.1f}% ({result.kept_blocks}/{result.total_blocks} blocks)",
             f"changed {100 * result.changed_fraction:.1f}%",
             "cache hit" if result.cache_hit else ("vision reused" if result.vision_cache_hit else "cache miss"),
             f"ttft {result.ttft_ms:.1f} ms"]
    if result.session_id:
        parts.append(f"session {result.session_id}")
    if result.random_weights:
        parts.append(RANDOM_WEIGHTS_NOTE)
    return " | ".join(parts)


def run_ground(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.ground(Path(args.image), args.instruction, session_id=args.session, **_pruning(args))
    print(json.dumps(result.to_json_dict()) if args.json else describe(result))
    return 0


def run_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else EXIT_RUNTIME


class _FrameSource:
    """Captures frames of one monitor at a steady rate and remembers each by sequence
    number until its answer (or a newer one) arrives. Iterated by gRPC's sending thread,
    which opens its own mss instance there (mss handles are per thread on Windows)."""

    def __init__(self, monitor: int, fps: float, count: int):
        if not fps > 0:
            raise ValueError("--fps must be > 0")
        if count < 0:
            raise ValueError("--frames must be >= 0")
        self.monitor, self.interval, self.count = monitor, 1.0 / fps, count
        self.sent = 0
        self._pending: dict[int, CapturedFrame] = {}
        self._lock = threading.Lock()

    def __iter__(self):
        with ScreenCapture(self.monitor) as capture:
            start = time.monotonic()
            while self.count == 0 or self.sent < self.count:
                delay = start + self.sent * self.interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                frame = capture.grab()
                with self._lock:
                    self.sent += 1
                    self._pending[self.sent] = frame
                yield frame.pixels

    def take(self, sequence: int) -> CapturedFrame:
        """The frame answered by `sequence`; older, skipped frames are forgotten."""
        with self._lock:
            frame = self._pending.pop(sequence, None)
            for old in [s for s in self._pending if s < sequence]:
                del self._pending[old]
        if frame is None:
            raise GroundingError(f"the server answered frame {sequence}, which was not sent or already answered")
        return frame


def run_live(args: argparse.Namespace) -> int:
    with ScreenCapture(args.monitor):  # no display or no such monitor: fail before connecting
        pass
    source = _FrameSource(args.monitor, args.fps, args.frames)
    answers = skipped = 0
    warned: set[str] = set()
    with _client(args) as client:
        annotate = Path(args.annotate) if args.annotate else None
        if annotate is not None:
            annotate.mkdir(parents=True, exist_ok=True)
        try:
            for result in client.stream(source, args.instruction, session_id=args.session, **_pruning(args)):
                frame = source.take(result.sequence)
                answers, skipped = answers + 1, skipped + result.skipped_frames
                report = _answer(result, frame, args, annotate, warned)
                print(json.dumps(report) if args.json else _live_line(result, report), flush=True)
        except KeyboardInterrupt:  # the way to end `--frames 0`: not an error
            pass
    print(f"pixelprune-agent live: frames sent {source.sent}, answers {answers}, skipped {skipped}",
          file=sys.stderr)
    return 0


def _answer(result: GroundResult, frame: CapturedFrame, args, annotate: Path | None, warned: set) -> dict:
    """Map, click and annotate one answer; the JSON report of it."""
    if result.random_weights and "random" not in warned:
        warned.add("random")
        print(f"pixelprune-agent live: note: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    m = frame.monitor
    frame_size = (frame.pixels.shape[1], frame.pixels.shape[0])
    report = result.to_json_dict()
    report.update(monitor={"index": m.index, "left": m.left, "top": m.top, "width": m.width, "height": m.height},
                  frame_size={"width": frame_size[0], "height": frame_size[1]},
                  global_point=None, click=None, clicked=False, annotation=None)
    if result.point is not None:
        gx, gy = frame_to_global(result.point[0], result.point[1], m, frame_size)
        cx, cy = click_target(result.point[0], result.point[1], m, frame_size)
        report.update(global_point={"x": gx, "y": gy}, click={"x": cx, "y": cy})
        if args.click:
            click(cx, cy)
            report["clicked"] = True
    if annotate is not None:
        if result.keep is None and "keep" not in warned:
            warned.add("keep")
            print("pixelprune-agent live: note: the server sent no keep mask (an older server, or a session "
                  "it stored): such frames are drawn without pruned blocks", file=sys.stderr)
        image = annotate_frame(frame.pixels, result)
        path = annotate / f"frame-{result.sequence:06d}.png"
        image.save(path, compress_level=1)
        report["annotation"] = str(path)
    return report


def annotate_frame(pixels: np.ndarray, result: GroundResult) -> Image.Image:
    """The frame as the model saw it (resized to the answer's model size), the blocks the
    server pruned (its keep mask, `result.keep`) dimmed and the block grid drawn, a caption
    strip below it (pixelprune.show.render_keep), with the answer's point marked by a circle
    and crosshair. Without a keep mask from the server nothing is dimmed and the caption says so."""
    height, width = pixels.shape[:2]
    model_w, model_h = result.model_size
    if model_w <= 0 or model_h <= 0:
        model_h, model_w = smart_resize(height, width)
    resized = resize_to(pixels, model_h, model_w)
    if result.keep is not None:
        image = render_keep(resized, result.keep, caption=f"frame {result.sequence}")
    else:
        everything = np.ones((model_h // BLOCK_SIZE, model_w // BLOCK_SIZE), dtype=bool)
        image = render_keep(resized, everything, caption=f"frame {result.sequence}: no keep mask from the server",
                            show_ratio=False)
    if result.point is not None:
        x, y = result.point[0] * model_w / width, result.point[1] * model_h / height
        draw = ImageDraw.Draw(image)
        for color, thick in (((255, 255, 255), 5), ((230, 30, 40), 2)):  # white halo under red
            draw.ellipse((x - POINT_RADIUS, y - POINT_RADIUS, x + POINT_RADIUS, y + POINT_RADIUS),
                         outline=color, width=thick)
            draw.line((x - 2 * POINT_RADIUS, y, x + 2 * POINT_RADIUS, y), fill=color, width=thick)
            draw.line((x, y - 2 * POINT_RADIUS, x, y + 2 * POINT_RADIUS), fill=color, width=thick)
    return image


def _live_line(result: GroundResult, report: dict) -> str:
    if result.point is None:
        where = "no point"
    else:
        g, c = report["global_point"], report["click"]
        where = (f"point ({result.point[0]:.1f}, {result.point[1]:.1f}) px -> global ({g['x']:.1f}, {g['y']:.1f})"
                 f" click ({c['x']}, {c['y']}){' clicked' if report['clicked'] else ''}")
    return (f"frame {result.sequence}: {where} | retain {100 * result.retain_ratio:.1f}% | "
            f"{'cache hit' if result.cache_hit else 'cache miss'} | ttft {result.ttft_ms:.1f} ms | "
            f"skipped {result.skipped_frames}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (GroundingError, DisplayError, ClickError, ValueError, OSError) as exc:  # one line: cli_common
        return report(f"pixelprune-agent {args.command}", exc)


if __name__ == "__main__":
    sys.exit(main())
