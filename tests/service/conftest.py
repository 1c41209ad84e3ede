"""Service test fixtures: one tiny-checkpoint engine per test session, servers on loopback port 0."""

from __future__ import annotations

import dataclasses
import io
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from pixelprune.grounding.v1 import grounding_pb2 as pb
from pixelprune.grounding.v1 import grounding_pb2_grpc as pb_grpc
from service.config import ServiceConfig

MAX_NEW_TOKENS = 4  # enough for the random model to say something; keeps each run short


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    from pixelprune.engine import GroundingEngine, ModelSpec

    loaded = GroundingEngine.load(ModelSpec(model=str(tiny_checkpoint), device="cpu", max_new_tokens=MAX_NEW_TOKENS))
    loaded.warmup()
    return loaded


class CountingEngine:
    """The real engine, with a record of the instructions it ran (to prove what did NOT run)."""

    def __init__(self, engine):
        self._engine = engine
        self.grounded: list[str] = []
        self.lock = threading.Lock()

    def ground(self, prepared, instruction, vision=None, **kwargs):
        with self.lock:
            self.grounded.append(instruction)
        return self._engine.ground(prepared, instruction, vision=vision, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.fixture()
def make_server(engine):
    """make_server(**config_overrides) -> (handle, CountingEngine); servers stop at teardown."""
    handles = []

    def make(warmup: bool = False, **overrides):
        counting = CountingEngine(engine)
        base = dict(model="tiny", port=0, metrics_port=0, host="127.0.0.1", max_new_tokens=MAX_NEW_TOKENS)
        config = dataclasses.replace(ServiceConfig(), **{**base, **overrides})
        from service.server import create_server

        handle = create_server(config, engine=counting, warmup=warmup)
        handles.append(handle)
        return handle, counting

    yield make
    for handle in handles:
        handle.stop(grace=0)


@pytest.fixture()
def channels():
    """channel(port) -> an insecure loopback channel, closed at teardown."""
    opened = []

    def open_channel(port: int) -> grpc.Channel:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


def stub_for(channel) -> pb_grpc.GroundingStub:
    return pb_grpc.GroundingStub(channel)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def raw_image(pixels: np.ndarray) -> pb.Image:
    height, width = pixels.shape[:2]
    return pb.Image(raw=pb.RawImage(width=width, height=height, rgb=np.ascontiguousarray(pixels).tobytes()))


def scrape(metrics_port: int) -> dict[str, float]:
    """/metrics -> {sample name with sorted labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
