"""`seat-sync`: the typer app and `main()`, and the one place where a failure becomes one line
on stderr and an exit code (see `worker.cli.errors`). Commands live in one module per group."""

from __future__ import annotations

from typing import Any

import typer
from rich.text import Text
from typer.core import TyperGroup

from worker.cli import db, invitations, processes, queries, sync
from worker.cli.errors import EXIT_CONFIG, EXIT_ERROR, EXIT_INTERRUPTED, CommandError
from worker.cli.output import err
from worker.config import ConfigError


def one_line(exc: Exception) -> tuple[str, int] | None:
    """What an expected failure says to a person, and the exit code; None for a bug (its
    traceback is worth seeing). The classes of the lower layers are imported here, on the
    failure path only, so that a command loads only what it uses."""
    if isinstance(exc, CommandError):
        return exc.message, exc.exit_code
    if isinstance(exc, ConfigError):
        return str(exc), EXIT_CONFIG

    from worker.platform.migrate import SchemaBehindError
    from worker.polar.errors import PolarError
    from worker.query.mirror import NoDatabaseError, database_failure
    from worker.sync.resync import PassBusyError

    if isinstance(exc, NoDatabaseError | SchemaBehindError | PolarError):
        return str(exc), EXIT_ERROR
    if isinstance(exc, PassBusyError):
        return f"{exc}; try again when it has finished", EXIT_ERROR
    database = database_failure(exc)
    if database is not None:
        return database, EXIT_ERROR
    if isinstance(exc, OSError):  # connection refused, unknown host, ...
        return f"cannot connect: {exc.strerror or exc}", EXIT_ERROR
    return None


class _OneLineFailures(TyperGroup):
    """The command group that translates what its commands raise."""

    def invoke(self, ctx: Any) -> Any:  # click's Context, vendored by typer since 0.2x
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            failure = one_line(exc)
            if failure is None:
                raise
            message, code = failure
            err.print(
                Text.assemble(("error:", "bold red"), " ", message),
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(code) from None


app = typer.Typer(
    name="seat-sync",
    cls=_OneLineFailures,
    help="Keep a local SQL mirror of Polar customer seats true, and query it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for group in (processes, sync, invitations, queries, db):
    app.add_typer(group.commands)


def main() -> None:
    app()
