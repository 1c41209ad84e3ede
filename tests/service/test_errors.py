"""The one mapping from exceptions to gRPC status codes, and a bug reaching a real server."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest

from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.errors import Cancelled, DeadlineExpired, QueueFull, status_of
from service.images import ImageError
from service_testlib import raw_image, scrape, stub_for


class OutOfMemoryError(RuntimeError):
    """Named like torch.OutOfMemoryError (the mapping goes by name, so torch is not imported)."""


@pytest.mark.parametrize("exc, code, message", [
    (ValueError("instruction is empty"), grpc.StatusCode.INVALID_ARGUMENT, "instruction is empty"),
    (ImageError("image is empty (0x5)"), grpc.StatusCode.INVALID_ARGUMENT, "image is empty (0x5)"),
    (QueueFull("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"),
    (DeadlineExpired(), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline expired before the model ran"),
    (Cancelled(), grpc.StatusCode.CANCELLED, "request cancelled"),
    (OutOfMemoryError("CUDA out of memory"), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "the model ran out of device memory; retry with a smaller image"),
    (KeyError("secret internals"), grpc.StatusCode.INTERNAL, "internal error (KeyError); see the server log"),
])
def test_status_of(exc, code, message):
    assert status_of(exc) == (code, message)


def test_a_bug_is_internal_logged_and_the_server_keeps_serving(make_server, channels, caplog):
    handle, counting = make_server()
    real_step = counting.step

    def step(on_step=None):  # the engine loop's entry into the engine
        if any(s.payload.instruction == "explode" for s in counting.scheduler.waiting):
            return {}["no such key"]
        return real_step(on_step)

    counting.step = step
    stub = stub_for(channels(handle.port))
    pixels = np.full((256, 256, 3), 7, np.uint8)
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        with pytest.raises(grpc.RpcError) as info:
            stub.Ground(pb.GroundRequest(image=raw_image(pixels), instruction="explode"), timeout=60)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error (KeyError); see the server log"
    assert "Ground failed with a bug" in caplog.text and "no such key" in caplog.text
    assert stub.Ground(pb.GroundRequest(image=raw_image(pixels), instruction="fine"), timeout=60).total_blocks == 64
    samples = scrape(handle.metrics_port)
    assert samples["pixelprune_request_duration_seconds_count{code=INTERNAL,rpc=Ground}"] == 1


def test_denied_calls_are_counted(make_server, channels, tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    handle, _ = make_server(auth_token_file=str(token))
    with pytest.raises(grpc.RpcError):
        stub_for(channels(handle.port)).Ground(pb.GroundRequest(instruction="x"), timeout=10)
    samples = scrape(handle.metrics_port)
    assert samples["pixelprune_request_duration_seconds_count{code=UNAUTHENTICATED,rpc=Ground}"] == 1
