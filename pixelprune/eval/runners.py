"""Who answers a sample in `pixelprune eval`: a model in this process, or a running service.

    EngineRunner("Qwen/Qwen3-VL-2B-Instruct", device="cuda")   # GroundingEngine (the `model` extra)
    ServiceRunner("grounding.example:50051", token="...", tls=True)   # its gRPC contract (the `client` extra)
    answer = runner.answer(Path("shot.png"), "the Save button", PruneSettings.parse("pred2d:max:0.02"))

Both return an `Answer` with the click in pixels of the screenshot file, the blocks the
model saw, the time to first token and the prompt's KV-cache bytes. torch and grpc are
imported when a runner is built, never when this module is imported. The service runner
speaks the generated stubs of the contract (`pixelprune_api`) itself: the library never
imports the client package (`agent_client`), which sits above it.

A failure that concerns one sample (an image the model cannot take, a request the server
rejects) raises `SampleFailed` and the run goes on; one that ends the run (the server
unreachable, the token refused, a checkpoint that cannot be read) raises `RunnerFailed`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pixelprune.eval.records import Answer
from pixelprune.geometry import to_rgb_array
from pixelprune.settings import PruneSettings

GROUNDING_SERVICE = "pixelprune.grounding.v1.Grounding"
SERVED_FORMATS = ("PNG", "JPEG", "WEBP")  # image files sent as they are (the server decodes these); others as PNG
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's default --max-message-bytes
# UNAVAILABLE (server down, restarting, not yet listening) is retried by gRPC itself, within the
# request's deadline: 3 more attempts, after random waits of up to 0.2, 0.4, 0.8 s.
RETRY_POLICY = {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "5s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}


class SampleFailed(Exception):
    """This sample could not be answered; the others still can."""


class RunnerFailed(Exception):
    """Nothing more can be answered (server gone, token refused)."""


def _missing_extra(exc: ModuleNotFoundError, flag: str, extra: str) -> RunnerFailed:
    return RunnerFailed(f"{exc}; {flag} needs the '{extra}' extra: pip install 'pixelprune[{extra}]'")


def unreadable_image(path: Path, exc: BaseException) -> str:
    """One line for an image file Pillow cannot read (its own message names a file object's repr)."""
    if isinstance(exc, UnidentifiedImageError):
        return f"cannot read image {path}: not an image file Pillow can read"
    return f"cannot read image {path} ({' '.join(str(exc).split())})"


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
        except ValueError as exc:  # not a Qwen3-VL checkpoint, bad device or dtype
            raise ValueError(f"cannot load model {model}: {' '.join(str(exc).split())}") from None
        except OSError as exc:  # unreadable or incomplete checkpoint files
            raise RunnerFailed(f"cannot load model {model}: {' '.join(str(exc).split())}") from None
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
                raise SampleFailed(unreadable_image(image, exc)) from None
        return self._image[1]

    def answer(self, image: Path, instruction: str, settings: PruneSettings) -> Answer:
        pixels = self._pixels(image)
        try:
            out = self.engine.ground(self.engine.prepare(pixels, settings), instruction)
        except ValueError as exc:
            raise SampleFailed(str(exc)) from None
        return Answer(point=out.point, raw_answer=out.raw_text, kept_blocks=out.kept_blocks,
                      total_blocks=out.total_blocks, ttft_ms=1000.0 * out.timings.ttft,
                      kv_bytes=out.kv_cache_bytes or None, random_weights=self.engine.is_random_weights,
                      answer_logprob=out.answer_logprob)

    def close(self) -> None:
        self._image = None


def image_bytes(path: Path) -> bytes:
    """What a request carries for a screenshot file: its bytes when the server decodes the format
    (SERVED_FORMATS), else its pixels as PNG. SampleFailed when Pillow cannot read it."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if image.format in SERVED_FORMATS:
                return data
            out = io.BytesIO()
            Image.fromarray(to_rgb_array(image)).save(out, format="PNG", compress_level=1)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SampleFailed(unreadable_image(path, exc)) from None


class ServiceRunner:
    """A running `pixelprune serve`, over its gRPC contract (plaintext, or TLS with `tls`: True for
    the system's root certificates, a path for a PEM file of them). Each request carries the
    setting under test as its PruningSettings and no session (no answer comes from a cache)."""

    def __init__(self, target: str, token: str | None = None, tls: bool | str | Path | None = None,
                 timeout: float = 60.0):
        try:
            import grpc
            from pixelprune_api.grounding.v1 import grounding_pb2, grounding_pb2_grpc
        except ModuleNotFoundError as exc:
            raise _missing_extra(exc, "--target", "client") from None
        self._grpc, self._pb = grpc, grounding_pb2
        service_config = {"methodConfig": [{"name": [{"service": GROUNDING_SERVICE}], "retryPolicy": RETRY_POLICY}]}
        options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(service_config)),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if tls:
            roots = None if tls is True else Path(tls).read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._ground = grounding_pb2_grpc.GroundingStub(self._channel).Ground
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.target, self.timeout = target, timeout
        self.source = f"service at {target}"

    def _pruning(self, settings: PruneSettings):
        pruning = self._pb.PruningSettings
        if not settings.enabled:
            return pruning(disabled=True)
        return pruning(method=pruning.Method.Value(f"METHOD_{settings.method.upper()}"),
                       metric=pruning.Metric.Value(f"METRIC_{settings.metric.upper()}"), tau=settings.tau)

    def answer(self, image: Path, instruction: str, settings: PruneSettings) -> Answer:
        request = self._pb.GroundRequest(image=self._pb.Image(encoded=image_bytes(image)), instruction=instruction,
                                         pruning=self._pruning(settings))
        try:
            r = self._ground(request, timeout=self.timeout, metadata=self._metadata)
        except self._grpc.RpcError as exc:
            raise self._failure(exc) from None
        # kv_cache_bytes 0 = the model did not run (a session cache hit; eval sends no session): shown as n/a
        return Answer(point=(r.point.x, r.point.y) if r.found else None, raw_answer=r.raw_answer,
                      kept_blocks=r.kept_blocks, total_blocks=r.total_blocks, ttft_ms=r.timings.ttft_ms,
                      kv_bytes=r.kv_cache_bytes or None, random_weights=r.random_weights,
                      answer_logprob=r.answer_logprob)

    def _failure(self, exc) -> Exception:
        """RunnerFailed when no request can succeed (unreachable, token refused), else SampleFailed."""
        code, details = exc.code(), " ".join((exc.details() or "no details").split())
        status = self._grpc.StatusCode
        if code == status.UNAVAILABLE:
            return RunnerFailed(f"cannot reach the grounding server at {self.target}: {details}")
        if code == status.UNAUTHENTICATED:
            why = "a bad token" if self._metadata else "no token given"
            return RunnerFailed(f"the server at {self.target} refused the request ({why}): {details}")
        if code == status.DEADLINE_EXCEEDED:
            return SampleFailed(f"no answer from {self.target} within {self.timeout:g} s")
        return SampleFailed(f"{code.name}: {details}")

    def close(self) -> None:
        self._channel.close()
