"""A denied call is answered before its message is read (the body is never received)."""

from __future__ import annotations

import grpc
import pytest

from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.auth import _denying
from service_testlib import status_code, stub_for


def test_the_deny_handler_takes_a_request_stream_for_every_method_shape():
    def handler(request, context):  # pragma: no cover - never called
        raise AssertionError("the method's own handler ran")

    shapes = [grpc.unary_unary_rpc_method_handler(handler), grpc.unary_stream_rpc_method_handler(handler),
              grpc.stream_unary_rpc_method_handler(handler), grpc.stream_stream_rpc_method_handler(handler)]
    denied = [_denying(shape) for shape in shapes]
    assert [d.request_streaming for d in denied] == [True] * 4  # gRPC reads no message before the handler
    assert [d.response_streaming for d in denied] == [s.response_streaming for s in shapes]
    assert all(d.request_deserializer is None for d in denied)


@pytest.mark.parametrize("token, expected", [
    ("wrong", grpc.StatusCode.UNAUTHENTICATED),  # refused on the metadata: the oversized body is never read
    ("right", grpc.StatusCode.RESOURCE_EXHAUSTED),  # accepted: gRPC reads the body and finds it too large
])
def test_a_denied_call_never_reads_its_message(make_server, channels, tmp_path, token, expected):
    """The server takes at most 1 KiB messages. A 4 KiB message with a known token is read and
    refused as too large; with a wrong one the call is UNAUTHENTICATED: the body was never read."""
    token_file = tmp_path / "token"
    token_file.write_text("right\n")
    handle, _ = make_server(auth_token_file=str(token_file), max_message_bytes=1024)
    stub = stub_for(channels(handle.port))
    metadata = [("authorization", f"Bearer {token}")]
    big = pb.Image(encoded=bytes(4096))
    assert status_code(lambda: stub.Ground(pb.GroundRequest(image=big, instruction="x"), metadata=metadata,
                                           timeout=30)) == expected
    frames = iter([pb.Frame(image=big, instruction="x")])
    assert status_code(lambda: list(stub.GroundStream(frames, metadata=metadata, timeout=30))) == expected
