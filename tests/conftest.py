"""Shared fixtures: a fresh real database (SQLite file and PostgreSQL) per test, a real Redis
database flushed per test, the simulated Polar over loopback HTTP, and started services.
Helpers that tests import live in `tests/support/`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from tests.support.processes import Database
from tests.support.settings import (
    BACKENDS,
    PG_ADMIN_URL,
    REDIS_BASE_URL,
    SIM_TOKEN,
    make_settings,
)
from worker.config import Settings
from worker.platform.db import create_engine, session_factory
from worker.platform.migrate import upgrade
from worker.resources import WorkerResources
from worker.simulator.server import SimulatedPolar


def _pg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{database}"


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"seat_sync_tpl_{os.getpid()}"

    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    upgrade(_pg_url(name))
    yield name
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of each configured backend."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "mirror.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    template_name: str = request.getfixturevalue("pg_template")
    name = f"seat_sync_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_name}"'))
    yield _pg_url(name)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A real Redis database, empty at the start of the test."""
    client = aioredis.Redis.from_url(REDIS_BASE_URL)
    await client.flushdb()
    await client.aclose()
    yield REDIS_BASE_URL
    client = aioredis.Redis.from_url(REDIS_BASE_URL)
    await client.flushdb()
    await client.aclose()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the test's database, for tests that read or write it directly."""
    created = create_engine(database_url)
    try:
        yield created
    finally:
        await created.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """The test's own view of the mirror that `seat-sync` processes write."""
    async with contextlib.aclosing(Database(database_url)) as opened:
        yield opened


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedPolar]:
    async with SimulatedPolar(token=SIM_TOKEN, seed=1234) as polar:
        yield polar


@pytest.fixture
def settings(database_url: str, sim: SimulatedPolar) -> Settings:
    return make_settings(database_url, sim)


@pytest.fixture
async def services(settings: Settings, redis_url: str) -> AsyncIterator[WorkerResources]:
    """What the worker's jobs get: the database, Polar, the fleet's Redis and budget."""
    started = await WorkerResources.create(settings, redis_url=redis_url)
    async with contextlib.aclosing(started):
        yield started
