"""One style across the project's command lines (`pixelprune serve`, `pixelprune eval`,
`pixelprune-agent ground / live / health`): defaults shown as `(default VALUE)` (never Python's
`None`), errors as one line `PROG CMD: error: ...` with no Python object's repr, exit status 2
for a wrong command line and 1 for a failure while running."""

from __future__ import annotations

import argparse
import re

import pytest

from agent_client import cli as agent_cli
from pixelprune import cli as pixelprune_cli
from pixelprune.cli_common import OneLineParser, describe_error, with_default
from pixelprune.eval import command as eval_command
from service import config as service_config


def agent_subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = agent_cli.build_parser()
    return dict(parser._subparsers._group_actions[0].choices)  # argparse keeps subparsers there


def parsers() -> dict[str, argparse.ArgumentParser]:
    found = {f"pixelprune-agent {name}": p for name, p in agent_subparsers().items()}
    for name, add in (("serve", service_config.add_arguments), ("eval", eval_command.add_arguments)):
        found[f"pixelprune {name}"] = p = OneLineParser(prog=f"pixelprune {name}")
        add(p)
    return found


def shown(default) -> str:
    return "on" if default is True else f"{default:g}" if isinstance(default, float) else str(default)


@pytest.mark.parametrize("prog", sorted(parsers()))
def test_every_default_is_shown_one_way(prog):
    for action in parsers()[prog]._actions:
        text = action.help or ""
        assert "None" not in text and not re.search(r"\[[^\]]*\]$", text), (prog, action.dest, text)
        assert "(default:" not in text and "default)" not in text, (prog, action.dest, text)
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, ""):
            assert re.search(rf"[(;] ?default {re.escape(shown(action.default))}[;)]", text), (prog, action.dest, text)


def test_with_default():
    assert with_default("seconds", 30.0) == "seconds (default 30)"
    assert with_default("a file", None, "PIXELPRUNE_X") == "a file (default none; env PIXELPRUNE_X)"
    assert with_default("cache size (0 = off)", 32) == "cache size (0 = off; default 32)"
    assert with_default("a switch", False) == "a switch (default off)"
    assert with_default("share", "50 %") == "share (default 50 %%)"  # argparse formats help with %


@pytest.mark.parametrize("exc, message, status", [
    (ValueError("--fps must be > 0"), "--fps must be > 0", 2),
    (FileNotFoundError(2, "No such file or directory", "shot.png"), "shot.png: no such file or directory", 2),
    (PermissionError(13, "Permission denied", "/root/t"), "/root/t: permission denied", 2),
    (OSError(28, "No space left on device", "out.png"), "out.png: no space left on device", 1),
    (ConnectionError("cannot reach\n the server"), "cannot reach the server", 1),
    (pixelprune_cli.CliError("stopped"), "stopped", 1),
])
def test_error_messages_and_exit_statuses(exc, message, status):
    assert describe_error(exc) == (message, status)


def test_a_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        pixelprune_cli.main(["serve", "--no-such-flag"])
    assert done.value.code == 2
    assert capsys.readouterr().err == ("pixelprune serve: error: unrecognized arguments: --no-such-flag "
                                       "(see pixelprune serve --help)\n")
    with pytest.raises(SystemExit) as done:
        pixelprune_cli.main([])
    assert done.value.code == 2
    assert capsys.readouterr().err == ("pixelprune: error: the following arguments are required: COMMAND "
                                       "(see pixelprune --help)\n")


@pytest.mark.parametrize("argv, message", [
    (["pixelprune", "show", "{notes}", "-o", "{tmp}/o.png"], "cannot read image"),
    (["pixelprune", "stats", "{notes}"], "cannot read image"),
    (["pixelprune", "eval", "{notes}", "--model", "x"], "cannot read the annotation file"),
    (["pixelprune", "serve", "--model", "{notes}"], "no such checkpoint directory: {notes}"),
    (["pixelprune-agent", "ground", "{notes}", "click", "--target", "127.0.0.1:1"], "{notes}: not an image file"),
])
def test_a_file_of_the_wrong_kind_never_shows_a_python_object(tmp_path, capsys, argv, message):
    notes = tmp_path / "notes.txt"
    notes.write_text("buy milk\n")
    argv = [a.format(notes=notes, tmp=tmp_path) for a in argv]
    main = pixelprune_cli.main if argv[0] == "pixelprune" else agent_cli.main
    assert main(argv[1:]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{argv[0]} {argv[1]}: error: ") and err.count("\n") == 1, err
    assert message.format(notes=notes) in err and " object at 0x" not in err
