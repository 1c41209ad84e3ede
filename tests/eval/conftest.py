"""Fixtures of the `pixelprune eval` tests: tiny checkpoints rigged to answer a fixed text,
the datasets of eval_testlib, and a real grounding server (loopback, port 0, bearer token)
serving the rigged checkpoint."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytest.register_assert_rewrite("eval_testlib")  # its assert_* helpers report like test code

from eval_testlib import ANSWER, write_pro, write_screenspot  # noqa: E402

TOKEN = "eval-test-token"
NO_POINT_ANSWER = "no point here"  # an answer without any point: every sample is a miss


@pytest.fixture(scope="session")
def rigged_checkpoint(tmp_path_factory):
    """The tiny random-weight checkpoint rigged to answer ANSWER to every prompt."""
    from pixelprune.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("eval-rigged") / "checkpoint", answer=ANSWER)


@pytest.fixture(scope="session")
def no_point_checkpoint(tmp_path_factory):
    from pixelprune.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("eval-no-point") / "checkpoint", answer=NO_POINT_ANSWER)


@pytest.fixture(scope="session")
def screenspot_dir(tmp_path_factory):
    """A ScreenSpot-v2-style folder (read-only: copy it to change it)."""
    return write_screenspot(tmp_path_factory.mktemp("screenspot"))


@pytest.fixture(scope="session")
def pro_dirs(tmp_path_factory):
    """(annotations folder, images folder) of a ScreenSpot-Pro-style set."""
    return write_pro(tmp_path_factory.mktemp("screenspot-pro"))


@pytest.fixture(scope="session")
def eval_token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-auth") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="session")
def rigged_server(rigged_checkpoint, eval_token_file):
    """A real `pixelprune serve` on 127.0.0.1 (port 0) with the rigged checkpoint, requiring TOKEN."""
    from service.config import from_args_and_env
    from service.server import create_server

    config = from_args_and_env(["--model", str(rigged_checkpoint), "--device", "cpu", "--host", "127.0.0.1",
                                "--port", "0", "--metrics-port", "-1", "--auth-token-file", str(eval_token_file)], {})
    handle = create_server(config)
    yield handle
    handle.stop(0)


@pytest.fixture(scope="session")
def rigged_tls_server(rigged_server, eval_token_file, tmp_path_factory):
    """The rigged checkpoint (the model of rigged_server) behind TLS with a self-signed certificate for
    127.0.0.1 (openssl), requiring TOKEN. Yields (handle, certificate path)."""
    from service.config import from_args_and_env
    from service.server import create_server

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed (Debian package openssl; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("eval-tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    config = from_args_and_env(["--model", "rigged", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
                                "--metrics-port", "-1", "--health-port", "-1", "--auth-token-file",
                                str(eval_token_file), "--tls-cert", str(cert), "--tls-key", str(key)], {})
    from pixelprune.model.engine import GroundingEngine

    loaded = rigged_server.grounder.engine  # its model and processor, in an engine of this server's own
    engine = GroundingEngine(loaded.model, loaded.processor, max_new_tokens=loaded.max_new_tokens,
                             is_random_weights=loaded.is_random_weights, batch=config.batch)
    handle = create_server(config, engine=engine)
    yield handle, cert
    handle.stop(0)
