"""What every command line of the project shares: errors, exit statuses, the help's defaults.

`pixelprune` (pixelprune.cli), its subcommands (`serve` in service.cli, `eval` in
pixelprune.eval.command, ...) and `pixelprune-agent` (agent_client.cli) all import
this module, which imports nothing of theirs: the arrows point down to it.

Errors: one line, `PROG CMD: error: MESSAGE`, on stderr, never a traceback or a
Python object's repr. Exit status 2 for usage (the command line is wrong: a bad
flag value, options that do not go together, a file named on it that is missing
or is not what it must be), 1 for runtime (the command line was fine, running it
failed: a server unreachable, a token refused, a model that cannot be fetched).
"""

from __future__ import annotations

import argparse
import sys

EXIT_RUNTIME = 1  # the command ran and failed
EXIT_USAGE = 2  # the command line is wrong (argparse's own status for usage errors)
EXIT_INTERRUPTED = 130  # Ctrl-C


class CliError(Exception):
    """A user-facing failure while running: printed as one line, exit status 1."""

    exit_status = EXIT_RUNTIME


class UsageError(CliError):
    """A wrong command line (value, combination, named file): one line, exit status 2."""

    exit_status = EXIT_USAGE


# Errors of a path named on the command line: usage, reported as "PATH: no such file or directory".
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def one_line(text: str) -> str:
    """Whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def describe_error(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) of an exception a command raised."""
    if isinstance(exc, CliError):
        return one_line(exc) or type(exc).__name__, exc.exit_status
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        status = EXIT_USAGE if isinstance(exc, PATH_ERRORS) else EXIT_RUNTIME
        return f"{exc.filename}: {exc.strerror[0].lower()}{exc.strerror[1:]}", status
    status = EXIT_USAGE if isinstance(exc, (ValueError, *PATH_ERRORS)) else EXIT_RUNTIME
    return one_line(exc) or type(exc).__name__, status


def report(prog: str, exc: BaseException) -> int:
    """Print `PROG: error: MESSAGE` (one line) on stderr; return the exit status."""
    message, status = describe_error(exc)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line `PROG: error: MESSAGE (see PROG --help)`,
    exit status 2, like every other error of the project (subparsers inherit the class)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """argparse's, but the subcommand reports the arguments it does not know (`PROG CMD: error:`)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            chosen = self
            for action in self._subparsers._group_actions if self._subparsers is not None else ():
                chosen = action.choices.get(getattr(parsed, action.dest, None), chosen)
            chosen.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def with_default(help_text: str, default, env: str | None = None) -> str:
    """`help_text (default VALUE; env NAME)`: the one way every CLI here shows a default (joined to
    a closing parenthesis the help ends with: `(0 = off; default 32)`). None reads "none",
    booleans "on"/"off"."""
    if default is None:
        shown = "none"
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = f"{default:g}" if isinstance(default, float) else str(default)
    note = f"default {shown}" + (f"; env {env}" if env else "")
    if help_text.endswith(")"):
        return f"{help_text[:-1]}; {note})".replace("%", "%%")
    return f"{help_text} ({note})".replace("%", "%%")
