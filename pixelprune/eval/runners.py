"""Who answers a sample in `pixelprune eval`: a model in this process, or a running service.

    EngineRunner("Qwen/Qwen3-VL-2B-Instruct", device="cuda")   # GroundingEngine (the `model` extra)
    ServiceRunner("127.0.0.1:50051", token_file="token")       # GroundingClient (the `client` extra)
    answer = runner.answer(Path("shot.png"), "the Save button", PruneSettings.parse("pred2d:max:0.02"))

Both return an `Answer` with the click in pixels of the screenshot file, the blocks the
model saw, the time to first token and the prompt's KV-cache bytes. torch and grpc are
imported when a runner is built, never when this module is imported.

A failure that concerns one sample (an image the model cannot take, a request the server
rejects) raises `SampleFailed` and the run goes on; one that ends the run (the server
unreachable, the token refused) raises `RunnerFailed`.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pixelprune.eval.records import Answer
from pixelprune.geometry import to_rgb_array
from pixelprune.settings import PruneSettings


class SampleFailed(Exception):
    """This sample could not be answered; the others still can."""


class RunnerFailed(Exception):
    """Nothing more can be answered (server gone, token refused)."""


def _missing_extra(exc: ModuleNotFoundError, flag: str, extra: str) -> ValueError:
    return ValueError(f"{exc}; {flag} needs the '{extra}' extra: pip install 'pixelprune[{extra}]'")


class EngineRunner:
    """The model loaded in this process (GroundingEngine), warmed up once before the first sample."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", warmup: bool = True,
                 profile: str = "auto"):
        try:
            from pixelprune.model.engine import GroundingEngine, ModelSpec
        except ModuleNotFoundError as exc:
            raise _missing_extra(exc, "--model", "model") from None
        try:
            self.engine = GroundingEngine.load(ModelSpec(model=model, device=device, dtype=dtype, profile=profile))
        except (OSError, ValueError) as exc:  # no such checkpoint, not a Qwen3-VL one, bad device or dtype
            raise ValueError(f"cannot load model {model!r}: {' '.join(str(exc).split())}") from None
        if warmup:
            self.engine.warmup()
        dtype_name = str(self.engine.dtype).removeprefix("torch.")
        self.source = f"model {model} ({self.engine.device}, {dtype_name}) profile {self.engine.profile.name}"
        self._image: tuple[Path, object] | None = None  # the last screenshot read: (path, pixels)

    def _pixels(self, image: Path):
        if self._image is None or self._image[0] != image:
            try:
                with Image.open(image) as opened:
                    self._image = (image, to_rgb_array(opened).copy())
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise SampleFailed(f"cannot read image {image} ({exc})") from None
        return self._image[1]

    def answer(self, image: Path, instruction: str, settings: PruneSettings) -> Answer:
        pixels = self._pixels(image)
        try:
            out = self.engine.ground(self.engine.prepare(pixels, settings), instruction)
        except ValueError as exc:
            raise SampleFailed(str(exc)) from None
        return Answer(point=out.point, raw_answer=out.raw_text, kept_blocks=out.kept_blocks,
                      total_blocks=out.total_blocks, ttft_ms=1000.0 * out.timings["ttft"],
                      kv_bytes=out.kv_cache_bytes or None, random_weights=self.engine.is_random_weights)

    def close(self) -> None:
        self._image = None


def read_token(token_file: str | Path | None) -> str | None:
    """The bearer token in `token_file` (stripped), or None without a file."""
    if token_file is None:
        return None
    token = Path(token_file).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"--token-file {token_file} is empty")
    return token


class ServiceRunner:
    """A running `pixelprune serve`, through agent_client's GroundingClient; each request carries
    the setting under test as its PruningSettings and no session (no answer comes from a cache)."""

    def __init__(self, target: str, token_file: str | Path | None = None, timeout: float = 60.0):
        try:
            from agent_client.client import GroundingClient
        except ModuleNotFoundError as exc:
            raise _missing_extra(exc, "--target", "client") from None
        self.client = GroundingClient(target, token=read_token(token_file), timeout=timeout)
        self.source = f"service at {target}"

    def answer(self, image: Path, instruction: str, settings: PruneSettings) -> Answer:
        from agent_client.client import AuthenticationError, GroundingError, ServerUnavailable

        pruning = (dict(method=settings.method, metric=settings.metric, tau=settings.tau) if settings.enabled
                   else dict(prune=False))
        try:
            result = self.client.ground(image, instruction, **pruning)
        except (AuthenticationError, ServerUnavailable) as exc:
            raise RunnerFailed(str(exc)) from None
        except (GroundingError, ValueError, OSError) as exc:  # rejected request, unreadable image
            raise SampleFailed(" ".join(str(exc).split())) from None
        # 0 = the model did not run (a session cache hit; eval sends no session): shown as n/a
        return Answer(point=result.point, raw_answer=result.raw_answer, kept_blocks=result.kept_blocks,
                      total_blocks=result.total_blocks, ttft_ms=result.ttft_ms, kv_bytes=result.kv_cache_bytes or None,
                      random_weights=result.random_weights)

    def close(self) -> None:
        self.client.close()
