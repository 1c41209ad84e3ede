"""`pixelprune eval --target`: the same datasets through a real grounding server (loopback,
port 0, bearer token, plaintext and TLS) serving the rigged checkpoint; the accuracies must be
the exact ones. A failure that ends the run exits 1, a wrong command line 2."""

from __future__ import annotations

import pytest

from eval_testlib import PRO_EXPECTED, SCREENSPOT_EXPECTED, assert_predictions, assert_table, read_jsonl
from net_testlib import free_port
from pixelprune.cli import main


def run_remote(data, server, token_file, *extra):
    args = ["eval", str(data), "--target", f"127.0.0.1:{server.port}", *extra]
    return main(args + (["--token-file", str(token_file)] if token_file else []))


def test_screenspot_through_the_service_is_exact(screenspot_dir, rigged_server, eval_token_file, tmp_path, capsys):
    md, jsonl = tmp_path / "eval.md", tmp_path / "eval.jsonl"
    assert run_remote(screenspot_dir, rigged_server, eval_token_file, "--markdown", str(md), "--jsonl", str(jsonl)) == 0
    out = capsys.readouterr().out
    assert_table(md.read_text(), SCREENSPOT_EXPECTED)
    # kept blocks per setting equal the selector's on the same screenshot: the per-request
    # PruningSettings reached the server (full -> disabled, tau 0 and 0.02 as sent)
    assert_predictions(jsonl, screenspot_dir)
    assert f"from service at 127.0.0.1:{rigged_server.port}" in out and out.startswith("RANDOM WEIGHTS")


def test_screenspot_pro_through_the_service_is_exact(pro_dirs, rigged_server, eval_token_file, tmp_path, capsys):
    annotations, images = pro_dirs
    md, jsonl = tmp_path / "eval.md", tmp_path / "eval.jsonl"
    assert run_remote(annotations, rigged_server, eval_token_file, "--images", str(images), "--markdown", str(md),
                      "--jsonl", str(jsonl)) == 0
    assert_table(md.read_text(), PRO_EXPECTED)
    assert_predictions(jsonl, annotations, images)
    capsys.readouterr()


def test_screenspot_through_the_service_over_tls_is_exact(screenspot_dir, rigged_tls_server, eval_token_file,
                                                         tmp_path, capsys):
    handle, cert = rigged_tls_server
    md, jsonl = tmp_path / "eval.md", tmp_path / "eval.jsonl"
    assert run_remote(screenspot_dir, handle, eval_token_file, "--tls-ca", str(cert), "--markdown", str(md),
                      "--jsonl", str(jsonl)) == 0
    assert_table(md.read_text(), SCREENSPOT_EXPECTED)
    assert_predictions(jsonl, screenspot_dir)
    assert f"from service at 127.0.0.1:{handle.port}" in capsys.readouterr().out


@pytest.mark.parametrize("tls", [(), ("--tls",)], ids=["plaintext", "system-roots"])
def test_a_tls_server_without_its_certificate_ends_the_run(screenspot_dir, rigged_tls_server, eval_token_file, capsys,
                                                          tls):
    """Plaintext to a TLS port, or TLS that does not trust the self-signed certificate: never a
    request in the clear, one line naming the target."""
    handle, _cert = rigged_tls_server
    assert run_remote(screenspot_dir, handle, eval_token_file, *tls, "--limit", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"pixelprune eval: error: stopped after 0 of 3 answers: cannot reach the grounding server "
                          f"at 127.0.0.1:{handle.port}: ")


def test_a_refused_token_ends_the_run_with_one_line(screenspot_dir, rigged_server, tmp_path, capsys):
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token\n")
    jsonl = tmp_path / "eval.jsonl"
    assert run_remote(screenspot_dir, rigged_server, wrong, "--jsonl", str(jsonl)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"pixelprune eval: error: stopped after 0 of 30 answers: the server at "
                   f"127.0.0.1:{rigged_server.port} refused the request (a bad token): missing or wrong bearer token")
    assert read_jsonl(jsonl) == []


def test_an_unreachable_service_ends_the_run_with_one_line(screenspot_dir, tmp_path, capsys):
    port = free_port()
    assert main(["eval", str(screenspot_dir), "--target", f"127.0.0.1:{port}", "--timeout", "10", "--limit", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"pixelprune eval: error: stopped after 0 of 3 answers: cannot reach the grounding server "
                          f"at 127.0.0.1:{port}: ")


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "--device and --dtype go with --model; the service has its own"),
    (["--token-file", "/nonexistent/token"], "/nonexistent/token: no such file or directory"),
    (["--tls-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem: no such file or directory"),
    (["--timeout", "0"], "--timeout must be > 0, got 0"),
])
def test_bad_service_arguments_are_one_line_errors(screenspot_dir, capsys, args, message):
    assert main(["eval", str(screenspot_dir), "--target", "127.0.0.1:1", *args]) == 2
    assert capsys.readouterr().err == f"pixelprune eval: error: {message}\n"


def test_eval_and_the_agent_take_the_same_connection_options():
    """`--target` with `--token-file`, `--tls`, `--tls-ca`, `--timeout`: the same flags and words in both CLIs."""
    import argparse

    from agent_client.cli import _add_channel_arguments
    from pixelprune.eval.command import add_arguments

    def helps(add) -> dict[str, str]:
        parser = argparse.ArgumentParser()
        add(parser)
        return {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}

    eval_help = helps(add_arguments)
    agent_help = helps(lambda parser: _add_channel_arguments(parser, 30.0, "deadline"))
    for flag in ("--target", "--token-file", "--tls", "--tls-ca", "--timeout"):
        assert flag in eval_help and flag in agent_help
    for flag in ("--token-file", "--tls", "--tls-ca"):
        assert eval_help[flag] == agent_help[flag]
