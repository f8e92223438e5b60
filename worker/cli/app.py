"""`seat-sync`: the typer app and `main()`, and the one place where a failure becomes one line
on stderr and an exit code (see `worker.cli.errors`). Commands live in one module per group.

Importing this loads typer and the command modules only: each command imports what it uses
when it runs, so a read of the mirror never pays for the worker's libraries.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from worker.cli import actions, db, invitations, plain, processes, queries, retention, sync
from worker.cli.errors import EXIT_CONFIG, EXIT_ERROR, EXIT_INTERRUPTED, CommandError


def _loaded(module: str, name: str) -> type[BaseException] | None:
    """The exception class `module.name` when that module was imported: an exception of a
    module nobody imported cannot have been raised, and importing it costs time."""
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


# click's base of its usage errors (a bad option value, an unknown command), whether typer
# vendors click or uses it.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def one_line(exc: Exception) -> tuple[str, int] | None:
    """What an expected failure says to a person, and the exit code; None for a bug (its
    traceback is worth seeing)."""
    if isinstance(exc, CommandError):
        return exc.message, exc.exit_code
    if isinstance(exc, _CLICK_ERROR):
        message = getattr(exc, "format_message", exc.__str__)()
        return f"{message} (see --help)", int(getattr(exc, "exit_code", EXIT_CONFIG))
    config_error = _loaded("worker.config", "ConfigError")
    if config_error is not None and isinstance(exc, config_error):
        return str(exc), EXIT_CONFIG

    from worker.query.mirror import NoDatabaseError, database_failure

    for module, name in (
        ("worker.platform.migrate", "SchemaBehindError"),
        ("worker.polar.errors", "PolarError"),
    ):
        known = _loaded(module, name)
        if known is not None and isinstance(exc, known):
            return str(exc), EXIT_ERROR
    if isinstance(exc, NoDatabaseError):
        return str(exc), EXIT_ERROR
    busy = _loaded("worker.sync.resync", "PassBusyError")
    if busy is not None and isinstance(exc, busy):
        return f"{exc}; try again when it has finished", EXIT_ERROR
    database = database_failure(exc)
    if database is not None:
        return database, EXIT_ERROR
    redis_error = _loaded("redis.exceptions", "ConnectionError")
    if redis_error is not None and isinstance(exc, redis_error):
        return f"cannot connect to Redis: {exc}", EXIT_ERROR
    if isinstance(exc, OSError):  # connection refused, unknown host, port in use, ...
        return (f"cannot connect: {exc.strerror}" if exc.strerror else str(exc)), EXIT_ERROR
    return None


def _quiet_stdout() -> None:
    """The reader of our output went away (`seat-sync changes | head`): drop what is left."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class _OneLineFailures(TyperGroup):
    """The command group that translates what its commands raise (and converts their
    parameters without pydantic: see `worker.cli.plain`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> Any:
        plain.install(self.get_params(ctx))
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            plain.install(command.get_params(ctx))  # its --help option included
        return name, command, rest

    def invoke(self, ctx: Any) -> Any:  # click's Context, vendored by typer since 0.2x
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            _quiet_stdout()
            raise typer.Exit(0) from None
        except Exception as exc:
            failure = one_line(exc)
            if failure is None:
                raise
            message, code = failure
            sys.stdout.flush()
            sys.stderr.write(f"error: {message}\n")
            raise typer.Exit(code) from None


app = typer.Typer(
    name="seat-sync",
    cls=_OneLineFailures,
    help="Keep a local SQL mirror of Polar customer seats true, and query it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for group in (processes, sync, actions, invitations, queries, retention, db):
    app.add_typer(group.commands)


def main() -> None:
    try:
        app()
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
