"""Domain exceptions -> gRPC status codes, in one place; and the bearer-token interceptor.

The servicer's handlers are wrapped by `unary_errors(rpc)` (Ground) and
`stream_errors(rpc)` (GroundStream), which both map exceptions with `status_of`:
a ValueError (bad input) becomes INVALID_ARGUMENT with its message, a full queue
or a device out of memory RESOURCE_EXHAUSTED, an expired deadline
DEADLINE_EXCEEDED, a cancelled call CANCELLED, and anything else INTERNAL with
the traceback logged (a bug: the client gets no internals). Every outcome is
reported to the servicer's `on_rpc_done(rpc, code_name, seconds)`.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from typing import Callable, Iterator

import grpc

log = logging.getLogger(__name__)

OPEN_SERVICE_PREFIXES = (  # reachable without a token: Kubernetes probes and tooling
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class QueueFull(Exception):
    """The model worker's queue is full: the client should back off and retry."""


class DeadlineExpired(Exception):
    """The client's deadline passed before the request reached the model."""


class Cancelled(Exception):
    """The client went away before the request reached the model."""


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and client-facing message of an exception raised while serving."""
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "server busy: model queue is full, retry later"
    if isinstance(exc, DeadlineExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline expired before the model ran"
    if isinstance(exc, Cancelled):
        return grpc.StatusCode.CANCELLED, str(exc) or "request cancelled"
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the model ran out of device memory; retry with a smaller image"
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or "invalid argument"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _mapped(rpc: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed with a bug", rpc, exc_info=exc)
    return code, message


def _outcome(context) -> str:
    """The code the client sees for a handler that returned: OK, unless the call already ended
    (its deadline passed while the model ran, or the client cancelled)."""
    if context.is_active():
        return "OK"
    return "DEADLINE_EXCEEDED" if context.time_remaining() == 0 else "CANCELLED"


def unary_errors(rpc: str) -> Callable:
    """Decorator for a unary handler `(self, request, context)`: map exceptions, report the outcome."""
    def wrap(handler):
        @functools.wraps(handler)
        def wrapped(self, request, context):
            start, on_done = time.perf_counter(), self.on_rpc_done
            try:
                response = handler(self, request, context)
            except Exception as exc:  # noqa: BLE001 - this is the one mapping point
                code, message = _mapped(rpc, exc)
                on_done(rpc, code.name, time.perf_counter() - start)
                context.abort(code, message)
            on_done(rpc, _outcome(context), time.perf_counter() - start)
            return response
        return wrapped
    return wrap


def stream_errors(rpc: str) -> Callable:
    """Decorator for a response-streaming handler (a generator): same mapping as `unary_errors`.
    A stream's duration is its whole lifetime."""
    def wrap(handler):
        @functools.wraps(handler)
        def wrapped(self, request_iterator, context) -> Iterator:
            start, on_done = time.perf_counter(), self.on_rpc_done
            try:
                yield from handler(self, request_iterator, context)
            except Exception as exc:  # noqa: BLE001
                code, message = _mapped(rpc, exc)
                on_done(rpc, code.name, time.perf_counter() - start)
                context.abort(code, message)
            except GeneratorExit:  # the client went away mid-stream
                on_done(rpc, "CANCELLED", time.perf_counter() - start)
                raise
            on_done(rpc, "OK" if context.is_active() else "CANCELLED", time.perf_counter() - start)
        return wrapped
    return wrap


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every RPC but health and reflection.

    The token is compared in constant time (hmac.compare_digest) so its value
    cannot be guessed from response times.
    """

    def __init__(self, token: str, on_denied: Callable[[str], None] | None = None):
        if not token:
            raise ValueError("auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._on_denied = on_denied

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICE_PREFIXES) or self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if self._on_denied is not None:
            self._on_denied(method)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
