"""`pixelprune-agent health` against real servers: NOT_SERVING before the warm-up, SERVING after,
NOT_SERVING from the moment draining starts, an unknown service, the health-only port, TLS, and a
server that is gone. The status goes to stdout; exit status 0 only for SERVING."""

from __future__ import annotations

import pytest

from agent_client.cli import main
from agent_testlib import server_config
from net_testlib import free_port

GROUNDING = "pixelprune.grounding.v1.Grounding"


def health(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["health", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def fresh_server(tiny_checkpoint, tiny_engine):
    """A server of its own (draining it is for good), not warmed up yet, with a health-only port."""
    from service.server import create_server

    handle = create_server(server_config(tiny_checkpoint, None), engine=tiny_engine(), warmup=False)
    yield handle
    handle.stop(0)


def test_not_serving_before_warmup_serving_after_and_while_draining_not(fresh_server, capsys):
    target = ["--target", f"127.0.0.1:{fresh_server.port}"]
    assert health(capsys, *target) == (1, "NOT_SERVING\n", "")
    fresh_server.warmup()
    assert health(capsys, *target) == (0, "SERVING\n", "")
    assert health(capsys, *target, "--service", GROUNDING) == (0, "SERVING\n", "")
    assert health(capsys, "--target", f"127.0.0.1:{fresh_server.health_port}") == (0, "SERVING\n", "")
    fresh_server.drain()  # what SIGTERM does first; the listener still serves during --drain-delay-s
    assert health(capsys, *target) == (1, "NOT_SERVING\n", "")
    assert health(capsys, *target, "--service", GROUNDING) == (1, "NOT_SERVING\n", "")
    assert health(capsys, "--target", f"127.0.0.1:{fresh_server.health_port}") == (1, "NOT_SERVING\n", "")


def test_an_unknown_service_is_a_one_line_error(grounding_server, capsys):
    target = f"127.0.0.1:{grounding_server.port}"
    assert health(capsys, "--target", target, "--service", "no.such.Service") == (
        1, "", f"pixelprune-agent health: error: the server at {target} reports no health for the service "
               "'no.such.Service'\n")


def test_health_needs_no_token_but_sends_one(grounding_server, token_file, capsys):
    target = ["--target", f"127.0.0.1:{grounding_server.port}"]
    assert health(capsys, *target) == (0, "SERVING\n", "")  # the server requires a token for Ground
    assert health(capsys, *target, "--token-file", str(token_file)) == (0, "SERVING\n", "")


def test_health_over_tls(tls_server, capsys):
    handle, cert = tls_server
    target = f"127.0.0.1:{handle.port}"
    assert health(capsys, "--target", target, "--tls-ca", str(cert)) == (0, "SERVING\n", "")
    code, out, err = health(capsys, "--target", target)  # plaintext to a TLS port
    assert (code, out) == (1, "") and err.startswith(
        f"pixelprune-agent health: error: cannot reach the grounding server at {target}: ")
    assert err.count("\n") == 1


def test_unreachable_server(capsys):
    target = f"127.0.0.1:{free_port()}"
    code, out, err = health(capsys, "--target", target, "--timeout", "2")
    assert (code, out) == (1, "")
    assert err.startswith(f"pixelprune-agent health: error: cannot reach the grounding server at {target}: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as done:
        main(["health"])
    assert done.value.code == 2
    assert capsys.readouterr().err == ("pixelprune-agent health: error: the following arguments are required: "
                                       "--target (see pixelprune-agent health --help)\n")
    assert health(capsys, "--target", "127.0.0.1:1", "--timeout", "0") == (
        2, "", "pixelprune-agent health: error: --timeout must be > 0\n")
