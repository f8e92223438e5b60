"""Shared fixtures: a fresh real database (SQLite file and PostgreSQL) per test, a real Redis
database flushed per test, the simulated Polar over loopback HTTP, and started services."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from worker.config import Settings
from worker.platform.migrate import upgrade
from worker.resources import Services
from worker.schedule.jobs import build_worker

if TYPE_CHECKING:
    from worker.simulator.server import SimulatedPolar

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
BACKENDS = [
    b.strip()
    for b in os.environ.get("SEAT_SYNC_TEST_DATABASES", "sqlite,postgresql").split(",")
    if b.strip()
]
SIM_TOKEN = "polar_oat_simulated"
# An endpoint secret as Polar issues it today: `whsec_` + base64 of 32 random bytes, signed
# with the decoded bytes (Standard Webhooks). Fixed, so a failing run can be replayed.
WEBHOOK_SECRET = "whsec_c2VhdC1zeW5jIHRlc3RzOiBhIDMyLWJ5dGUga2V5ISE="


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
async def sim() -> AsyncIterator[SimulatedPolar]:
    from worker.simulator.server import SimulatedPolar

    polar = SimulatedPolar(token=SIM_TOKEN, seed=1234)
    await polar.start()
    try:
        yield polar
    finally:
        await polar.stop()


def make_settings(database_url: str, sim: SimulatedPolar | None = None, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "polar_access_token": SIM_TOKEN,
        "polar_api_url": sim.base_url if sim is not None else "http://127.0.0.1:9",
        "polar_webhook_secret": WEBHOOK_SECRET,
        "polar_timeout_seconds": 3.0,
        # Tests that are about the budget set their own; the rest must not wait on it.
        "polar_requests_per_minute": 1_000_000,
        "log_format": "json",
    }
    values.update(extra)
    return Settings(**values)


@pytest.fixture
def settings(database_url: str, sim: SimulatedPolar) -> Settings:
    return make_settings(database_url, sim)


@pytest.fixture
async def services(settings: Settings, redis_url: str) -> AsyncIterator[Services]:
    started = await Services.start(settings, redis_url=redis_url)
    try:
        yield started
    finally:
        await started.close()


async def run_worker_until_idle(
    settings: Settings, redis_url: str, *, max_jobs: int = 10, cron_jobs: bool = False
) -> Any:
    """Run an in-process arq worker until the queue is empty (burst mode). Its cron jobs
    are off unless asked for, so that tests count Polar calls exactly."""
    worker = build_worker(
        settings,
        redis_url,
        burst=True,
        handle_signals=False,
        max_jobs=max_jobs,
        cron_jobs=cron_jobs,
    )
    try:
        await worker.async_run()
    finally:
        await worker.close()
    return worker
