"""The exit codes of `seat-sync`, and the failure a command raises to stop with one line.

Every failure becomes one line on stderr and one of these codes in one place: the app
(`worker.cli.app`). Commands only raise."""

from __future__ import annotations

EXIT_ERROR = 1
"""Something failed: Polar refused, the database is unreachable, a scope is gone."""
EXIT_CONFIG = 2
"""A setting or an argument is wrong; nothing was attempted."""
EXIT_DRIFT = 3
"""`verify` found the mirror differing from Polar (and did not repair it)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C."""


class CommandError(Exception):
    """Stop the command: `message` on stderr, exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(CommandError):
    """The arguments given cannot work together (exit 2, before anything is attempted)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_CONFIG)
