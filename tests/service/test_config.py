"""ServiceConfig: flags over PIXELPRUNE_* environment over defaults; one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from pixelprune.settings import PruneSettings
from service.config import (MIB, ServiceConfig, bare_token_tenant, configure, env_name, from_args_and_env,
                            parse_token_file)


def test_defaults_are_the_documented_ones():
    config = from_args_and_env([], {})
    assert (config.port, config.metrics_port, config.host) == (50051, 9464, "0.0.0.0")
    assert config.max_message_bytes == 64 * MIB and config.max_image_pixels == 50_000_000
    assert (config.queue_size, config.session_ttl_s, config.batch.vision_cache_size, config.drain_grace_s) == \
        (16, 600.0, 32, 30.0)
    assert config.prune == PruneSettings(enabled=True, method="pred2d", metric="max", tau=0.0)
    assert config.redis_url is None and config.auth_token_file is None
    assert (config.max_inflight_pixels, config.max_instruction_tokens, config.stream_idle_timeout_s,
            config.health_port, config.drain_delay_s) == (50_000_000, 512, 60.0, 0, 5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1


def test_environment_fills_in_and_flags_win():
    env = {"PIXELPRUNE_PORT": "6000", "PIXELPRUNE_QUEUE_SIZE": "3", "PIXELPRUNE_REDIS_URL": "redis://r:6379/1",
           "PIXELPRUNE_PRUNE_TAU": "0.25", "PIXELPRUNE_NO_PRUNE": "true", "PIXELPRUNE_MODEL": "/ckpt"}
    config = from_args_and_env(["--port", "7000", "--prune-method", "raster"], env)
    assert config.port == 7000  # flag wins
    assert (config.queue_size, config.redis_url, config.spec.model) == (3, "redis://r:6379/1", "/ckpt")
    assert config.prune == PruneSettings(enabled=False, method="raster", metric="max", tau=0.25)
    assert from_args_and_env(["--no-prune"], {}).prune.enabled is False
    assert from_args_and_env([], {"PIXELPRUNE_NO_PRUNE": "0"}).prune.enabled is True


def test_env_names():
    assert env_name("--max-message-bytes") == "PIXELPRUNE_MAX_MESSAGE_BYTES"


@pytest.mark.parametrize("argv, env, fragment", [
    (["--port", "70000"], {}, "--port must be in 0..65535"),
    (["--queue-size", "0"], {}, "--queue-size must be >= 1"),
    ([], {"PIXELPRUNE_QUEUE_SIZE": "many"}, "PIXELPRUNE_QUEUE_SIZE: cannot read 'many'"),
    (["--prune-method", "zigzag"], {}, "--prune-method: unknown pruning method"),
    (["--prune-metric", "mse"], {}, "--prune-metric: unknown pruning metric"),
    (["--prune-tau", "1.5"], {}, "--prune-tau: pruning tau must be a finite number in [0, 1]"),
    (["--prune-tau", "nan"], {}, "--prune-tau: pruning tau must be a finite number in [0, 1]"),
    (["--tls-cert", "/x.pem"], {}, "--tls-cert and --tls-key go together"),
    (["--auth-token-file", "/nonexistent/token"], {}, "no such file"),
    (["--redis-url", "http://x"], {}, "--redis-url must start with"),
    ([], {"PIXELPRUNE_NO_PRUNE": "maybe"}, "not a boolean"),
    (["--max-inflight-pixels", "999"], {}, "--max-inflight-pixels (999) must be >= --max-image-pixels (50000000)"),
    (["--max-instruction-tokens", "0"], {}, "--max-instruction-tokens must be >= 1"),
    (["--stream-idle-timeout-s", "-1"], {}, "--stream-idle-timeout-s must be >= 0"),
    (["--health-port", "70000"], {}, "--health-port must be in -1..65535"),
    (["--health-port", "9464"], {}, "--health-port 9464 is already the gRPC or metrics port"),
    ([], {"PIXELPRUNE_DRAIN_DELAY_S": "inf"}, "--drain-delay-s must be >= 0"),
])
def test_bad_settings_give_one_line_errors(argv, env, fragment):
    with pytest.raises(ValueError) as info:
        from_args_and_env(argv, env)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_auth_token_file_with_one_bare_token(tmp_path):
    """The old format: the whole file is one token. Its tenant is named after a digest of the
    token, so two servers with different tokens on one Redis do not share sessions."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    config = from_args_and_env(["--auth-token-file", str(token_file)], {})
    assert config.auth_tenants() == {"s3cret": bare_token_tenant("s3cret")}
    assert bare_token_tenant("s3cret") == "token-" + hashlib.blake2b(
        b"s3cret", digest_size=8, person=b"pixelprune-tnt").hexdigest()
    assert bare_token_tenant("other") != bare_token_tenant("s3cret")
    token_file.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        config.auth_tenants()
    assert ServiceConfig().auth_tenants() is None


def test_auth_token_file_with_tenants():
    text = "# tenant token\n\nalice  tok-a1\nbob\ttok-b\n  alice tok-a2  \n"
    assert parse_token_file(text) == {"tok-a1": "alice", "tok-b": "bob", "tok-a2": "alice"}


@pytest.mark.parametrize("text, fragment", [
    ("# only a comment\n", "is empty"),
    ("alice tok-a\nlonely-token\n", "tokens.txt line 2: must be `TENANT TOKEN` (then an optional # comment), got 1 "
                                     "field(s)"),
    ("# tenants\n\nalice tok a\n", "tokens.txt line 3: must be `TENANT TOKEN`"),  # the file's line, not the entry's
    ("alice tok-a # rotated # twice\nbob tok b\n", "line 2: must be `TENANT TOKEN` (then an optional # comment), got 3"),
    ("al/ice tok-a\n", "line 1: tenant 'al/ice' must be 1..64 characters"),
    ("alice tok\n# bob\nbob tok\n", "line 3: a token is listed twice (tenants 'alice' and 'bob')"),
])
def test_bad_token_files(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_token_file(text, "tokens.txt")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_session_key_prefix_separates_models_and_answer_lengths():
    from service.server import session_key_prefix

    base = from_args_and_env(["--model", "/models/a"], {})
    same = from_args_and_env(["--model", "/models/a", "--port", "50052"], {})  # another replica
    other_model = from_args_and_env(["--model", "/models/b"], {})
    longer = from_args_and_env(["--model", "/models/a", "--max-new-tokens", "48"], {})
    prefix = session_key_prefix(base)
    assert prefix.startswith(base.redis_prefix) and prefix.endswith(":")
    assert len(prefix) == len(base.redis_prefix) + 13  # 12 hex digits and a colon
    assert session_key_prefix(same) == prefix
    assert session_key_prefix(other_model) != prefix and session_key_prefix(longer) != prefix


def test_batching_flags_and_environment():
    """The engine's flags fill ServiceConfig.batch (a BatchSettings, the one set of defaults) and .spec."""
    from pixelprune.model.request import BatchSettings, ModelSpec

    config = from_args_and_env([], {})
    assert config.batch == BatchSettings() and config.spec == ModelSpec()
    assert (config.batch.max_batch_size, config.batch.max_batch_tokens, config.batch.prefix_cache_bytes) == (
        32, None, 1024 * MIB)
    assert (config.batch.kv_cache_memory_fraction, config.batch.max_prefill_tokens, config.admission_wait_s,
            config.stall_timeout_s) == (0.5, 8192, 1.0, 30.0)
    assert (config.batch.cuda_graphs, config.batch.stop_after_point) == (True, False)
    env = {"PIXELPRUNE_MAX_BATCH_SIZE": "8", "PIXELPRUNE_PREFIX_CACHE_BYTES": "0", "PIXELPRUNE_NO_CUDA_GRAPHS": "yes",
           "PIXELPRUNE_KV_CACHE_MEMORY_FRACTION": "0.8"}
    config = from_args_and_env(["--max-batch-tokens", "4096", "--stop-after-point", "--max-batch-size", "4",
                                "--max-prefill-tokens", "2048", "--admission-wait-s", "0", "--stall-timeout-s", "5",
                                "--max-new-tokens", "9", "--model", "/m"], env)
    assert config.batch == BatchSettings(max_batch_size=4, max_batch_tokens=4096, kv_cache_memory_fraction=0.8,
                                         max_prefill_tokens=2048, cuda_graphs=False, stop_after_point=True,
                                         prefix_cache_bytes=0)
    assert config.spec == ModelSpec(model="/m", max_new_tokens=9)
    assert (config.admission_wait_s, config.stall_timeout_s) == (0.0, 5.0)
    assert configure(config, max_batch_size=2, no_cuda_graphs=False).batch == dataclasses.replace(
        config.batch, max_batch_size=2, cuda_graphs=True)
    with pytest.raises(TypeError, match="unknown serve option 'max_batch'"):
        configure(max_batch=2)
    for argv, fragment in ((["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
                           (["--max-batch-tokens", "100"], "--max-batch-tokens must be >= 256"),
                           (["--kv-cache-memory-fraction", "0"], r"--kv-cache-memory-fraction must be in \(0, 1\]"),
                           (["--max-prefill-tokens", "0"], "--max-prefill-tokens must be >= 1"),
                           (["--stall-timeout-s", "0"], "--stall-timeout-s must be > 0"),
                           (["--prefix-cache-bytes", "-1"], "--prefix-cache-bytes must be >= 0")):
        with pytest.raises(ValueError, match=fragment):
            from_args_and_env(argv, {})
    with pytest.raises(ValueError, match="not a boolean"):
        from_args_and_env([], {"PIXELPRUNE_STOP_AFTER_POINT": "perhaps"})
