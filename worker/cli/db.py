"""`seat-sync db upgrade`: migrate the database at DATABASE_URL to the schema this code needs."""

from __future__ import annotations

from typing import Annotated

import typer

from worker.cli.environment import settings_from_env
from worker.cli.output import say

schema = typer.Typer(help="Database schema commands.", no_args_is_help=True)

commands = typer.Typer()
commands.add_typer(schema, name="db")


@schema.command("upgrade")
def upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the database at DATABASE_URL to the latest schema."""
    from worker.platform.db import redacted
    from worker.platform.migrate import upgrade as migrate

    settings = settings_from_env()
    migrate(settings.database_url, revision)
    say(f"database {redacted(settings.database_url)} is at {revision}")
