"""Service test fixtures: one tiny-checkpoint engine per test session, servers on loopback port 0."""

from __future__ import annotations

import grpc
import pytest

from service.config import configure
from service_testlib import MAX_NEW_TOKENS, CountingEngine


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    from pixelprune.model.engine import GroundingEngine, ModelSpec

    loaded = GroundingEngine.load(ModelSpec(model=str(tiny_checkpoint), device="cpu", max_new_tokens=MAX_NEW_TOKENS))
    loaded.warmup()
    return loaded


@pytest.fixture()
def make_server(engine):
    """make_server(**config_overrides) -> (handle, CountingEngine); servers stop at teardown."""
    handles = []

    def make(warmup: bool = False, **overrides):
        base = dict(model="tiny", port=0, metrics_port=0, health_port=0, host="127.0.0.1",
                    max_new_tokens=MAX_NEW_TOKENS, max_batch_tokens=8192,
                    admission_wait_s=0.2)
        config = configure(**{**base, **overrides})
        from pixelprune.model.engine import GroundingEngine
        from service.server import create_server

        # the loaded weights, with this server's own batch and caches (nothing reused across tests)
        counting = CountingEngine(GroundingEngine(engine.model, engine.processor, max_new_tokens=MAX_NEW_TOKENS,
                                                  is_random_weights=engine.is_random_weights,
                                                  batch=config.batch))
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
