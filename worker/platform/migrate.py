"""Schema migrations: `seat-sync db upgrade`, and the check that refuses a schema behind code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).with_name("migrations")


class SchemaBehindError(Exception):
    """The database is at an older revision than this code needs."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # '%' would be read as interpolation by configparser.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def upgrade(database_url: str, revision: str = "head") -> None:
    """Blocking: run from a thread when inside an event loop (alembic's env uses asyncio.run)."""
    command.upgrade(alembic_config(database_url), revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    def _read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_read)


def known_revisions() -> set[str]:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return {rev.revision for rev in script.walk_revisions()}


async def check_schema(engine: AsyncEngine) -> None:
    """Refuse a schema that is behind this code. A schema ahead of it (a newer release
    migrated first, during a rolling upgrade) is accepted: migrations only add."""
    current = await current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None or current in known_revisions():
        raise SchemaBehindError(
            f"database schema is at {current or 'nothing (empty database)'}, this code needs "
            f"{head}: run `seat-sync db upgrade`"
        )
