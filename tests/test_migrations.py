"""Schema migrations against the real databases: the head schema is the models' schema, and
migration 0004 (seat.polar_digest and its guard trigger) goes down and up again."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel, col

from worker.models import Seat  # also registers every table on SQLModel.metadata
from worker.platform.migrate import alembic_config, current_revision, head_revision, upgrade

GUARD = "seat_polar_digest_guard"


async def schema_differences(engine: AsyncEngine) -> list[Any]:
    """What autogenerate would write to bring the live schema to the models', compared as
    the migrations' env compares (types included) and with server defaults too."""

    def compare(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, SQLModel.metadata))

    async with engine.connect() as conn:
        return await conn.run_sync(compare)


async def digest_objects(engine: AsyncEngine) -> tuple[bool, set[str], set[str]]:
    """Whether seat.polar_digest exists, and the seat triggers and guard functions present
    (SQLite has no stored functions: its trigger holds the statement)."""

    def columns(conn: Connection) -> set[str]:
        return {c["name"] for c in inspect(conn).get_columns("seat")}

    async with engine.connect() as conn:
        has_column = "polar_digest" in await conn.run_sync(columns)
        if conn.dialect.name == "sqlite":
            triggers = await conn.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'seat'")
            )
            return has_column, set(triggers.scalars()), set()
        triggers = await conn.execute(
            text(
                "SELECT tgname FROM pg_trigger "
                "WHERE tgrelid = 'seat'::regclass AND NOT tgisinternal"
            )
        )
        functions = await conn.execute(
            text("SELECT proname FROM pg_proc WHERE proname = :name"), {"name": GUARD}
        )
        return has_column, set(triggers.scalars()), set(functions.scalars())


async def downgrade_to_0003(database_url: str) -> None:
    # Alembic's env runs its own event loop (asyncio.run): from a thread, as upgrade() says.
    await asyncio.to_thread(command.downgrade, alembic_config(database_url), "0003")


async def test_the_migrated_schema_is_the_models_schema(engine: AsyncEngine) -> None:
    # Nothing is filtered out: on both backends every table, column type, index and
    # default compares equal. What compare_metadata cannot represent (triggers and
    # functions: seat_polar_digest_guard) it does not report at all, so the tests below
    # look for those in the catalogues.
    assert await current_revision(engine) == head_revision()

    assert await schema_differences(engine) == []


async def test_downgrading_0004_removes_the_digest_column_trigger_and_function(
    database_url: str, engine: AsyncEngine
) -> None:
    await downgrade_to_0003(database_url)

    assert await current_revision(engine) == "0003"
    assert await digest_objects(engine) == (False, set(), set())


async def test_upgrading_again_restores_the_digest_and_its_guard(
    database_url: str, engine: AsyncEngine
) -> None:
    await downgrade_to_0003(database_url)

    await asyncio.to_thread(upgrade, database_url)

    assert await current_revision(engine) == head_revision()
    has_column, triggers, functions = await digest_objects(engine)
    assert (has_column, triggers) == (True, {GUARD})
    assert functions == (set() if engine.dialect.name == "sqlite" else {GUARD})
    assert await schema_differences(engine) == []
    # And the guard guards: a hand edit clears the digest.
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            insert(Seat).values(
                id="seat-1", created_at=now, status="pending", synced_at=now, polar_digest=b"d" * 8
            )
        )
        await conn.execute(update(Seat).values(email="edited@example.com"))
        digest = await conn.execute(select(col(Seat.polar_digest)))
        assert digest.scalar_one() is None
