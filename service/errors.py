"""Domain exceptions -> gRPC status codes, in one place; and requests that cannot be deserialised.

The servicer's handlers are wrapped by `unary_errors(rpc)` and `stream_errors(rpc)`:
a ValueError (bad input) becomes INVALID_ARGUMENT with its message; a full queue,
the pixel budget or a device out of memory RESOURCE_EXHAUSTED; an expired deadline
or an idle stream DEADLINE_EXCEEDED; a cancelled call CANCELLED; and anything else
INTERNAL with the traceback logged (a bug: the client gets no internals). Every call is reported
to the servicer's `on_rpc_start(rpc)` when it begins and `on_rpc_done(rpc, code_name, seconds)`
with its outcome.

Deserialisation: gRPC answers a request its deserializer cannot parse (malformed
protobuf, a string field that is not UTF-8) with INTERNAL and logs a traceback,
before any handler runs. `DecodeGuard` wraps the deserializers of the service's
methods so that such a request reaches the handler as an `Undecodable` value;
the wrappers above turn it into INVALID_ARGUMENT with one log line, counted like
any other outcome.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import grpc

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The model worker's queue (or the pixel budget) is full: the client should back off and retry."""


class DeadlineExpired(Exception):
    """The client's deadline passed before the request reached the model."""


class Cancelled(Exception):
    """The client went away before the request reached the model."""


class StreamIdle(Exception):
    """A stream sent no frame for --stream-idle-timeout-s while nothing of it was pending."""


class MalformedMessage(ValueError):
    """The request's bytes are not a valid message of the method's type (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Undecodable:
    """What a guarded deserializer returns instead of raising."""
    size: int  # bytes received
    error: str  # the parser's one-line complaint

    def exception(self) -> MalformedMessage:
        return MalformedMessage(f"request is not a valid protobuf message ({self.size} bytes): {self.error}")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and client-facing message of an exception raised while serving."""
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "server busy: model queue is full, retry later"
    if isinstance(exc, DeadlineExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline expired before the model ran"
    if isinstance(exc, StreamIdle):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "stream closed: no frame for too long"
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
    elif isinstance(exc, MalformedMessage):
        log.warning("%s: %s", rpc, message)  # one line, no traceback: a client error
    return code, message


def outcome(context, code: str = "OK") -> str:
    """The code the client sees: `code`, unless the call already ended (its deadline passed, or
    the client cancelled), whatever the handler made of that (e.g. gave up waiting for room)."""
    if context.is_active():
        return code
    return "DEADLINE_EXCEEDED" if context.time_remaining() == 0 else "CANCELLED"


def unary_errors(rpc: str) -> Callable:
    """Decorator for a unary handler `(self, request, context)`: map exceptions, report the outcome."""
    def wrap(handler):
        @functools.wraps(handler)
        def wrapped(self, request, context):
            start, on_done = time.perf_counter(), self.on_rpc_done
            self.on_rpc_start(rpc)
            try:
                if isinstance(request, Undecodable):
                    raise request.exception()
                response = handler(self, request, context)
            except Exception as exc:  # noqa: BLE001 - this is the one mapping point
                code, message = _mapped(rpc, exc)
                on_done(rpc, outcome(context, code.name), time.perf_counter() - start)
                context.abort(code, message)
            on_done(rpc, outcome(context), time.perf_counter() - start)
            return response
        return wrapped
    return wrap


def checked_requests(requests: Iterable) -> Iterator:
    """A stream's requests, raising MalformedMessage at the first one that could not be parsed."""
    for request in requests:
        if isinstance(request, Undecodable):
            raise request.exception()
        yield request


def stream_errors(rpc: str) -> Callable:
    """Decorator for a response-streaming handler (a generator): same mapping as `unary_errors`.
    The request iterator it passes on raises MalformedMessage for an unparseable frame."""
    def wrap(handler):
        @functools.wraps(handler)
        def wrapped(self, request_iterator, context) -> Iterator:
            start, on_done = time.perf_counter(), self.on_rpc_done
            self.on_rpc_start(rpc)
            try:
                yield from handler(self, checked_requests(request_iterator), context)
            except Exception as exc:  # noqa: BLE001
                code, message = _mapped(rpc, exc)
                on_done(rpc, outcome(context, code.name), time.perf_counter() - start)
                context.abort(code, message)
            except GeneratorExit:  # the client went away mid-stream
                on_done(rpc, "CANCELLED", time.perf_counter() - start)
                raise
            on_done(rpc, outcome(context), time.perf_counter() - start)
        return wrapped
    return wrap


def tolerant(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """A deserializer that returns Undecodable instead of raising."""
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, and anything else the parser raises
            return Undecodable(size=len(data), error=" ".join(f"{type(exc).__name__}: {exc}".split())[:200])
    return deserialize


class DecodeGuard(grpc.ServerInterceptor):
    """Gives the handlers of methods under `prefixes` tolerant deserializers (see the module docstring).
    Only those handlers know what to do with an Undecodable request."""

    def __init__(self, prefixes: tuple[str, ...]):
        self._prefixes = prefixes

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or handler.request_deserializer is None
                or not handler_call_details.method.startswith(self._prefixes)):
            return handler
        return _with_deserializer(handler, tolerant(handler.request_deserializer))


def _with_deserializer(handler, deserializer):
    """The same method handler with another request deserializer (grpc's public constructors)."""
    kind = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}
    behaviour, make = kind[(handler.request_streaming, handler.response_streaming)]
    return make(getattr(handler, behaviour), request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
