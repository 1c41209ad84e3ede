"""What arrives on the wire before the servicer: unparseable messages, reflection v1, the metrics' first scrape."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixelprune_api.grounding.v1 import grounding_pb2 as pb
from service.errors import Undecodable, tolerant
from service.metrics import CODES
from service_testlib import FrameFeed, raw_image, scrape, status_code, stub_for

GROUND = "/pixelprune.grounding.v1.Grounding/Ground"
STREAM = "/pixelprune.grounding.v1.Grounding/GroundStream"


def _raw_unary(channel):
    return channel.unary_unary(GROUND, request_serializer=None, response_deserializer=pb.GroundResponse.FromString)


def _non_utf8_instruction() -> bytes:
    """A GroundRequest whose instruction (field 2, a proto3 string) holds bytes that are not UTF-8."""
    return b"\x12\x02\xff\xfe"



def test_tolerant_deserializer():
    parse = tolerant(pb.GroundRequest.FromString)
    assert parse(pb.GroundRequest(instruction="ok").SerializeToString()).instruction == "ok"
    bad = parse(_non_utf8_instruction())
    assert isinstance(bad, Undecodable) and bad.size == 4 and "DecodeError" in bad.error
    assert "request is not a valid protobuf message (4 bytes)" in str(bad.exception())


def test_malformed_messages_are_invalid_argument_logged_once_and_counted(make_server, channels, caplog):
    handle, counting = make_server()
    channel = channels(handle.port)
    call = _raw_unary(channel)
    payloads = [b"\xff\xff\xff\xff", _non_utf8_instruction(), b"\x0a\x05abc", b"\x08"]  # varint, UTF-8, short, cut
    with caplog.at_level(logging.INFO):
        for payload in payloads:
            with pytest.raises(grpc.RpcError) as info:
                call(payload, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(f"request is not a valid protobuf message ({len(payload)} bytes)")
        with pytest.raises(grpc.RpcError) as info:  # a stream: the bad frame ends it with INVALID_ARGUMENT
            list(channel.stream_stream(STREAM, request_serializer=None)(iter([_non_utf8_instruction()]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    records = [r for r in caplog.records if "not a valid protobuf message" in r.getMessage()]
    assert len(records) == 5 and all(r.levelno == logging.WARNING and r.exc_info is None for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    samples = scrape(handle.metrics_port)
    assert samples["pixelprune_request_duration_seconds_count{code=INVALID_ARGUMENT,rpc=Ground}"] == 4
    assert samples["pixelprune_request_duration_seconds_count{code=INTERNAL,rpc=Ground}"] == 0
    assert samples["pixelprune_streams_total{code=INVALID_ARGUMENT}"] == 1
    assert counting.grounded == []


def test_fuzzed_bytes_never_give_internal(make_server, channels):
    handle, counting = make_server()
    call = _raw_unary(channels(handle.port))
    valid = pb.GroundRequest(image=pb.Image(encoded=b"\x89PNG\r\n"), instruction="x",
                             session_id="s").SerializeToString()
    sent = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=64),
                     st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
                         lambda t: valid[:t[0]] + bytes([t[1]]) + valid[t[0] + 1:]),
                     st.integers(0, len(valid)).map(lambda n: valid[:n])))
    def check(payload):
        sent.append(payload)
        assert status_code(lambda: call(payload, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT

    check()
    samples = scrape(handle.metrics_port)
    assert samples["pixelprune_request_duration_seconds_count{code=INVALID_ARGUMENT,rpc=Ground}"] == len(sent)
    assert counting.grounded == []


def test_reflection_v1_beside_v1alpha(make_server, channels):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    handle, _ = make_server()
    channel = channels(handle.port)
    # v1 messages from the v1 file the server added to its pool (one process here: the same pool).
    pool = descriptor_pool.Default()
    request_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse"))
    info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                 request_serializer=request_cls.SerializeToString,
                                 response_deserializer=response_cls.FromString)
    listed, described = info(iter([request_cls(list_services=""),
                                   request_cls(file_containing_symbol="grpc.reflection.v1.ServerReflection")]),
                             timeout=10)
    names = {s.name for s in listed.list_services_response.service}
    assert names == {"pixelprune.grounding.v1.Grounding", "grpc.health.v1.Health",
                     "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
    (file_bytes,) = described.file_descriptor_response.file_descriptor_proto
    assert b"grpc/reflection/v1/reflection.proto" in file_bytes and b"grpc.reflection.v1alpha" not in file_bytes
    assert names == set(ProtoReflectionDescriptorDatabase(channel).get_services())  # v1alpha: the same answer


def test_every_code_series_exists_from_the_start_and_no_created_series(make_server):
    handle, _ = make_server()
    samples = scrape(handle.metrics_port)
    for code in CODES:
        assert samples[f"pixelprune_request_duration_seconds_count{{code={code},rpc=Ground}}"] == 0
        assert samples[f"pixelprune_stream_frame_duration_seconds_count{{code={code}}}"] == 0
        assert samples[f"pixelprune_streams_total{{code={code}}}"] == 0
    assert not [name for name in samples if "_created" in name]
    assert samples["pixelprune_inflight_pixels"] == 0 and samples["pixelprune_open_streams"] == 0
    assert samples["pixelprune_inflight_pixels_limit"] == 50_000_000


def test_stream_answers_raw_frames_after_the_guard(make_server, channels):
    """The guard changes nothing for valid frames."""
    handle, _ = make_server()
    feed = FrameFeed()
    call = stub_for(channels(handle.port)).GroundStream(iter(feed), timeout=60)
    feed.send(pb.Frame(image=raw_image(np.full((64, 64, 3), 9, np.uint8)), instruction="x", sequence=5))
    assert next(call).sequence == 5
    feed.send(None)
    assert list(call) == []
