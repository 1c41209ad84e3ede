"""Python client of the PixelPrune grounding service (`pixelprune.grounding.v1`): the RPCs.

    with GroundingClient("localhost:50051", token="s3cret") as client:
        result = client.ground("screen.png", "click the Save button")
        if result.point is not None:
            x, y = result.point          # pixels of the screenshot as sent
        result.keep                      # bool (rows, cols): the 32x32 blocks the model saw

How images travel (PNG level 1 or raw RGB) is agent_client.frames; the values
going in and out (pruning settings, GroundResult, GroundingError) are
agent_client.messages.

Unary calls are retried on UNAVAILABLE only (server down, restarting, or not
yet listening), with exponential backoff and jitter, inside one overall
deadline (`timeout`). Every other status is final: retrying a bad request or a
bad token cannot succeed. A stream's frames are not replayed, but a stream that
the server ends while frames are still coming (a draining replica ends its
streams with OK after their current frame) is reopened for the next frames, in
the same session, with the instruction and pruning in force; opening it again is
retried on UNAVAILABLE like a unary call, so the load balancer's next replica
takes over. Failures surface as `GroundingError` (subclasses per cause) whose
message is one line.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_client.frames import (DEFAULT_MAX_MESSAGE_BYTES, MESSAGE_OVERHEAD_BYTES, ImageInput,
                                 check_frame_encoding, encode_image)
from agent_client.messages import (AuthenticationError, GroundingError, GroundResult, InvalidRequest,
                                   ServerUnavailable, pruning_settings)
from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from pixelprune_api.grounding.v1 import grounding_pb2_grpc as pb_grpc

__all__ = ["GroundingClient", "GroundingError", "GroundResult", "ServerUnavailable", "AuthenticationError",
           "InvalidRequest"]

log = logging.getLogger("agent_client")

DEFAULT_TIMEOUT_S = 30.0  # overall deadline of one unary call, retries included
BACKOFF_INITIAL_S = 0.2  # first retry delay before jitter; doubles per retry
BACKOFF_MAX_S = 5.0  # cap of one retry delay


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no details"


def _channel_credentials(tls) -> grpc.ChannelCredentials | None:
    """None/False -> plaintext; True -> TLS with the system roots; bytes or a path -> those roots."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    roots = bytes(tls) if isinstance(tls, (bytes, bytearray)) else Path(tls).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=roots)


class _FrameSource:
    """A stream's frames, shared by the calls that carry them (one after the other: a reopened stream takes
    over): numbered from 1 across them, with the session, instruction and pruning in force; `done` once the
    caller's frames are exhausted. gRPC pulls requests on its own thread, so the frames are taken under a
    lock, and a frame taken for a call that has already ended is given back for the next one."""

    def __init__(self, frames: Iterable, instruction: str, session_id: str | None, settings: pb.PruningSettings):
        self._frames = iter(frames)
        self._lock = threading.Lock()
        self._back: tuple | None = None
        self.instruction, self.session_id, self.settings = instruction, session_id, settings
        self.sequence = 0  # the last frame's number
        self.done = False

    def take(self) -> tuple | None:
        """(image, new instruction or None), or None once the frames are exhausted."""
        with self._lock:
            if self._back is not None:
                item, self._back = self._back, None
                return item
            try:
                item = next(self._frames)
            except StopIteration:
                self.done = True
                return None
            return item if isinstance(item, tuple) else (item, None)

    def give_back(self, item: tuple) -> None:
        with self._lock:
            self._back = item


class GroundingClient:
    """A channel to one grounding server; use as a context manager (closes the channel)."""

    def __init__(self, target: str, token: str | None = None, tls=None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: int = 3,
                 frame_encoding: str = "png", backoff_initial: float = BACKOFF_INITIAL_S,
                 backoff_max: float = BACKOFF_MAX_S):
        if not target or not isinstance(target, str):
            raise ValueError("target must be HOST:PORT")
        if not (timeout > 0 and retries >= 0 and max_message_bytes > MESSAGE_OVERHEAD_BYTES
                and 0 < backoff_initial <= backoff_max):
            raise ValueError("timeout, backoff_initial, backoff_max must be > 0 (initial <= max), retries >= 0, "
                             f"max_message_bytes > {MESSAGE_OVERHEAD_BYTES}")
        check_frame_encoding(frame_encoding)
        if token is not None and (not token.strip() or not token.strip().isprintable() or not token.isascii()):
            raise ValueError("token must be non-empty printable ASCII (one line)")
        self.target, self.timeout, self.retries = target, float(timeout), int(retries)
        self.max_message_bytes, self.frame_encoding = int(max_message_bytes), frame_encoding
        self.backoff_initial, self.backoff_max = float(backoff_initial), float(backoff_max)
        self._metadata = (("authorization", f"Bearer {token.strip()}"),) if token is not None else ()
        self._has_token = token is not None
        self._jitter = random.Random()
        options = [("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.max_receive_message_length", self.max_message_bytes),
                   # Reconnect about as eagerly as we retry, so a server that comes up is seen.
                   ("grpc.initial_reconnect_backoff_ms", int(self.backoff_initial * 1000)),
                   ("grpc.min_reconnect_backoff_ms", int(self.backoff_initial * 1000)),
                   ("grpc.max_reconnect_backoff_ms", int(self.backoff_max * 1000))]
        creds = _channel_credentials(tls)
        self._channel = (grpc.insecure_channel(target, options=options) if creds is None
                         else grpc.secure_channel(target, creds, options=options))
        self._stub = pb_grpc.GroundingStub(self._channel)

    def __enter__(self) -> GroundingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._channel.close()

    def ground(self, image: ImageInput, instruction: str, session_id: str | None = None,
               method: str | None = None, metric: str | None = None, tau: float | None = None,
               prune: bool = True) -> GroundResult:
        """Ground `instruction` on one screenshot. Retries UNAVAILABLE within `timeout`."""
        _check_instruction(instruction)
        request = pb.GroundRequest(
            image=encode_image(image, self.max_message_bytes, self.frame_encoding), instruction=instruction,
            session_id=session_id or "", pruning=pruning_settings(method, metric, tau, prune))
        return GroundResult.from_pb(self._with_retries("Ground", self._stub.Ground, request))

    def health(self, service: str = "") -> str:
        """The server's grpc.health.v1 status of `service` ("" = the server as a whole): "SERVING",
        "NOT_SERVING" (warming up or draining), ... One attempt within `timeout`, not retried
        (a probe reports what is, now). GroundingError when the server cannot be asked."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(request, timeout=self.timeout,
                                                                     metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise GroundingError(f"the server at {self.target} reports no health for the service '{service}'",
                                     exc.code()) from None
            raise self._error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _with_retries(self, name: str, rpc, request):
        """Call a unary rpc within one deadline of `timeout` seconds, retrying UNAVAILABLE
        only, after min(backoff_max, backoff_initial * 2**n) seconds times a jitter in [0.5, 1]
        (so that clients cut off together do not come back together)."""
        deadline = time.monotonic() + self.timeout
        for attempt in range(self.retries + 1):
            try:
                return rpc(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise self._error(exc) from None
                delay = self._delay(attempt)
                if time.monotonic() + delay >= deadline:
                    raise self._error(exc) from None
                log.info("%s: server %s unavailable; retry %d of %d in %.2f s",
                         name, self.target, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def stream(self, frames: Iterable, instruction: str, session_id: str | None = None,
               method: str | None = None, metric: str | None = None, tau: float | None = None,
               prune: bool = True, timeout: float | None = None) -> Iterator[GroundResult]:
        """Stream frames in one session and yield the answers as they come.

        Each item of `frames` is an image, or `(image, new_instruction)` to change the
        instruction from that frame on. The n-th frame gets sequence number n (from 1),
        echoed in `GroundResult.sequence`; when frames arrive faster than answers, the
        server answers the newest and reports the dropped ones in `skipped_frames`, so
        frames sent == answers + sum(skipped_frames), over every stream of the session. A stream the
        server ends before the frames end (a draining replica) is reopened for the next frames (see the
        module docstring). `timeout` bounds each stream (None = no deadline). Closing the generator
        cancels the call."""
        _check_instruction(instruction)  # checked now, not at the first next()
        settings = pruning_settings(method, metric, tau, prune)
        return self._stream(frames, instruction, session_id, settings, timeout)

    def _stream(self, frames, instruction, session_id, settings, timeout) -> Iterator[GroundResult]:
        source = _FrameSource(frames, instruction, session_id, settings)
        attempt = 0
        while True:
            failure: list[BaseException] = []
            alive = threading.Event()
            alive.set()
            call = self._stub.GroundStream(self._requests(source, failure, alive), timeout=timeout,
                                           metadata=self._metadata)
            try:
                for response in call:
                    result = GroundResult.from_pb(response)
                    source.session_id, attempt = result.session_id or source.session_id, 0
                    yield result
            except grpc.RpcError as exc:
                if failure:
                    raise failure[0] from None
                if exc.code() != grpc.StatusCode.UNAVAILABLE or source.done or attempt >= self.retries:
                    raise self._error(exc, timeout) from None
                log.info("stream: server %s unavailable; retry %d of %d", self.target, attempt + 1, self.retries)
                time.sleep(self._delay(attempt))
                attempt += 1
                continue
            finally:
                alive.clear()
                call.cancel()
            if failure:
                raise failure[0]
            if source.done:
                return
            log.info("the server at %s ended the stream before its frames did (draining): reopening it for "
                     "session %s", self.target, source.session_id or "(new)")

    def _delay(self, attempt: int) -> float:
        """Seconds before retry `attempt` + 1: min(backoff_max, backoff_initial * 2**attempt) times a jitter in
        [0.5, 1] (so that clients cut off together do not come back together)."""
        return min(self.backoff_max, self.backoff_initial * 2 ** attempt) * self._jitter.uniform(0.5, 1.0)

    def _requests(self, source: _FrameSource, failure: list, alive: threading.Event) -> Iterator[pb.Frame]:
        """Frames as protos; the first frame of each (re)opened stream carries the session, the instruction
        and the pruning in force. An error here (bad image, capture failure) ends the stream cleanly and is
        re-raised by `stream` instead of being lost in gRPC's thread."""
        first = True
        try:
            while (item := source.take()) is not None:
                if not alive.is_set():  # this call has ended: the frame is the next stream's
                    source.give_back(item)
                    return
                image, new_instruction = item
                source.sequence += 1
                if new_instruction:
                    _check_instruction(new_instruction)
                    source.instruction = new_instruction
                frame = pb.Frame(image=encode_image(image, self.max_message_bytes, self.frame_encoding),
                                 sequence=source.sequence)
                if first:
                    frame.instruction, frame.session_id = source.instruction, source.session_id or ""
                    frame.pruning.CopyFrom(source.settings)
                    first = False
                elif new_instruction:
                    frame.instruction = new_instruction
                yield frame
        except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
            failure.append(exc)

    def _error(self, exc: grpc.RpcError, timeout: float | None = None) -> GroundingError:
        """One place that turns a gRPC status into a one-line GroundingError."""
        code, details = exc.code(), _one_line(exc.details() or "")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnavailable(f"cannot reach the grounding server at {self.target}: {details}", code)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            why = "a bad token" if self._has_token else "no token given"
            return AuthenticationError(f"the server at {self.target} refused the request ({why}): {details}", code)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(f"the server rejected the request: {details}", code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            limit = self.timeout if timeout is None else timeout
            return GroundingError(f"no answer from {self.target} within {limit:g} s", code)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return GroundingError(f"the server at {self.target} is overloaded or the message too large: {details}",
                                  code)
        return GroundingError(f"{code.name} from {self.target}: {details}", code)


def _check_instruction(instruction: str) -> None:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string")
