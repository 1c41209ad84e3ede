"""The stream flags: defaults, environment, and one-line errors."""

from __future__ import annotations

import pytest

from service.config import from_args_and_env


def test_stream_flag_defaults_and_environment():
    config = from_args_and_env([], {})
    assert (config.stream_first_frame_timeout_s, config.max_open_streams, config.max_streams_per_tenant,
            config.max_streams_per_peer, config.max_concurrent_rpcs) == (5.0, 192, 64, 64, 256)
    config = from_args_and_env(["--max-open-streams", "10"], {
        "PIXELPRUNE_MAX_CONCURRENT_RPCS": "16", "PIXELPRUNE_STREAM_FIRST_FRAME_TIMEOUT_S": "2.5",
        "PIXELPRUNE_MAX_STREAMS_PER_TENANT": "0", "PIXELPRUNE_MAX_STREAMS_PER_PEER": "3",
        "PIXELPRUNE_MAX_OPEN_STREAMS": "12"})
    assert (config.stream_first_frame_timeout_s, config.max_open_streams, config.max_streams_per_tenant,
            config.max_streams_per_peer, config.max_concurrent_rpcs) == (2.5, 10, 0, 3, 16)


@pytest.mark.parametrize("argv, fragment", [
    (["--max-open-streams", "256"], "--max-open-streams (256) must be >= 1 and below --max-concurrent-rpcs (256)"),
    (["--max-concurrent-rpcs", "100"], "--max-open-streams (192) must be >= 1 and below --max-concurrent-rpcs (100)"),
    (["--max-open-streams", "0"], "--max-open-streams (0) must be >= 1"),
    (["--stream-first-frame-timeout-s", "-1"], "--stream-first-frame-timeout-s must be >= 0"),
    (["--stream-first-frame-timeout-s", "inf"], "--stream-first-frame-timeout-s must be >= 0"),
    (["--max-streams-per-tenant", "-1"], "--max-streams-per-tenant must be >= 0"),
    (["--max-streams-per-peer", "-2"], "--max-streams-per-peer must be >= 0"),
])
def test_bad_stream_flags_give_one_line_errors(argv, fragment):
    with pytest.raises(ValueError) as info:
        from_args_and_env(argv, {})
    assert fragment in str(info.value) and "\n" not in str(info.value)
