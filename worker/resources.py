"""The resources a process needs, built once at startup by `create()` and closed by `aclose()`.

One shape per kind of process, so that a function's signature says what it uses and nothing
is looked up or checked at run time:

- `Resources`: the settings and the database (opened read-only for queries);
- `PolarResources`: adds the Polar client, for a command a person runs that calls Polar;
- `WorkerResources`: the worker's, where Redis (the queue) and the fleet's rate budget
  are always there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis, create_pool
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from worker.config import Settings
from worker.platform.db import create_engine, session_factory
from worker.polar.budget import RedisBudget
from worker.polar.client import PolarClient
from worker.queue import redis_settings

# `create()` differs per variant, as __init__ may: each is built from what it needs, and
# nothing builds a variant through its base class.


@dataclass(frozen=True, kw_only=True)
class Resources:
    """The settings and the database: all that a query, or a command that only writes the
    database, needs."""

    settings: Settings
    """The validated environment of this process."""
    engine: AsyncEngine
    """The one engine (connection pool) of the process; disposed by `aclose()`."""
    sessions: async_sessionmaker[AsyncSession]
    """Sessions on `engine`. The caller of a job, request or command owns the transaction."""

    @classmethod
    async def create(cls, settings: Settings, *, read_only: bool = False) -> Resources:
        """`read_only`: the database refuses writes (queries, `seat-sync status`)."""
        engine = create_engine(settings.database_url, read_only=read_only)
        return cls(settings=settings, engine=engine, sessions=session_factory(engine))

    async def aclose(self) -> None:
        await self.engine.dispose()


def _budget(settings: Settings, redis: ArqRedis) -> RedisBudget:
    return RedisBudget(
        redis,
        settings.polar_requests_per_minute,
        window_ms=int(settings.polar_rate_window_seconds * 1000),
    )


def _polar_client(settings: Settings, budget: RedisBudget | None) -> PolarClient:
    return PolarClient(
        settings.polar_api_url,
        settings.require_token(),
        timeout=settings.polar_timeout_seconds,
        budget=budget,
        api_version=settings.polar_api_version,
    )


async def _open_polar(
    settings: Settings, redis_url: str | None
) -> tuple[dict[str, Any], RedisBudget | None]:
    """The fields of a Polar variant (engine, sessions, Redis when given, and a client
    spending from the fleet's budget in that Redis), and that budget. Nothing stays open
    if a step fails."""
    settings.require_token()  # fail before opening anything
    engine = create_engine(settings.database_url)
    redis: ArqRedis | None = None
    try:
        redis = await create_pool(redis_settings(redis_url)) if redis_url is not None else None
        budget = _budget(settings, redis) if redis is not None else None
        polar = _polar_client(settings, budget)
    except BaseException:
        if redis is not None:
            await redis.aclose()
        await engine.dispose()
        raise
    fields = {
        "settings": settings,
        "engine": engine,
        "sessions": session_factory(engine),
        "polar": polar,
        "redis": redis,
    }
    return fields, budget


@dataclass(frozen=True, kw_only=True)
class PolarResources(Resources):
    """The database and Polar: what syncing, the full resync, reminders and verification use."""

    polar: PolarClient
    """The process's one Polar client; it spends from the fleet's budget when Redis is there."""
    redis: ArqRedis | None
    """The fleet's Redis. None only for a command run by hand where no Redis is configured
    or running: then nothing is queued, the full-resync lock is not taken, and the rate
    budget is this process's alone."""

    @classmethod
    async def create(  # type: ignore[override]
        cls, settings: Settings, *, redis_url: str | None
    ) -> PolarResources:
        fields, _ = await _open_polar(settings, redis_url)
        return cls(**fields)

    async def aclose(self) -> None:
        try:
            await self.polar.aclose()
            if self.redis is not None:
                await self.redis.aclose()
        finally:
            await super().aclose()


@dataclass(frozen=True, kw_only=True)
class WorkerResources(PolarResources):
    """The worker's: jobs enqueue follow-ups, take fleet-wide locks and report the budget."""

    redis: ArqRedis
    """The queue's Redis, shared by the fleet (rate budget, locks, coalescing)."""
    budget: RedisBudget
    """The fleet's Polar request budget; `polar` spends from it on every call."""

    @classmethod
    async def create(  # type: ignore[override]
        cls, settings: Settings, *, redis_url: str
    ) -> WorkerResources:
        fields, budget = await _open_polar(settings, redis_url)
        assert budget is not None  # a Redis URL was given
        return cls(**fields, budget=budget)
