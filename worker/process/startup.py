"""What a process does before its work: find (or start) Redis, bring the schema up, and open
the resources a command that calls Polar needs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from worker.config import Settings
from worker.platform.db import is_sqlite
from worker.platform.migrate import check_schema, upgrade
from worker.platform.redis import EmbeddedRedis
from worker.query.mirror import running_redis_url
from worker.resources import PolarResources, Resources


async def resolve_redis_url(
    settings: Settings, *, start: bool
) -> tuple[str | None, EmbeddedRedis | None]:
    """REDIS_URL when set; else the private Redis: started when `start` (reused if one is
    already serving the data directory; the caller stops what it started), else found."""
    if settings.redis_url is None and start:
        embedded = EmbeddedRedis(settings.data_dir)
        return await embedded.start(), embedded
    return await running_redis_url(settings), None


async def prepare_database(settings: Settings) -> None:
    """The embedded SQLite default upgrades itself; other databases need `db upgrade`."""
    if is_sqlite(settings.database_url):
        await asyncio.to_thread(upgrade, settings.database_url)


async def ensure_schema(settings: Settings) -> None:
    """Before a long-running process starts: SQLite upgrades itself, others must be current
    (SchemaBehindError otherwise)."""
    await prepare_database(settings)
    resources = await Resources.create(settings)
    try:
        await check_schema(resources.engine)
    finally:
        await resources.aclose()


@contextlib.asynccontextmanager
async def operating(settings: Settings) -> AsyncIterator[PolarResources]:
    """Resources for a command that calls Polar: it shares the fleet's rate budget when a
    Redis (REDIS_URL, or a running private one) is there, and runs without one otherwise."""
    await prepare_database(settings)
    redis_url, _ = await resolve_redis_url(settings, start=False)
    resources = await PolarResources.create(settings, redis_url=redis_url)
    try:
        await check_schema(resources.engine)
        yield resources
    finally:
        await resources.aclose()
