"""The resources a process needs, built once at startup and closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis, create_pool
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from worker.config import Settings
from worker.platform.db import create_engine, session_factory
from worker.polar.budget import RedisBudget
from worker.polar.client import PolarClient
from worker.queue import redis_settings


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: ArqRedis | None
    budget: RedisBudget | None
    polar: PolarClient | None

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        redis_url: str | None,
        polar: bool = True,
        read_only: bool = False,
    ) -> Services:
        engine = create_engine(settings.database_url, read_only=read_only)
        redis: ArqRedis | None = None
        budget: RedisBudget | None = None
        client: PolarClient | None = None
        try:
            if redis_url is not None:
                redis = await create_pool(redis_settings(redis_url))
                budget = RedisBudget(
                    redis,
                    settings.polar_requests_per_minute,
                    window_ms=int(settings.polar_rate_window_seconds * 1000),
                )
            if polar:
                client = PolarClient(
                    settings.polar_api_url,
                    settings.require_token(),
                    timeout=settings.polar_timeout_seconds,
                    budget=budget,
                    api_version=settings.polar_api_version,
                )
        except BaseException:
            await engine.dispose()
            if redis is not None:
                await redis.aclose()
            raise
        return cls(settings, engine, session_factory(engine), redis, budget, client)

    def require_polar(self) -> PolarClient:
        if self.polar is None:
            raise RuntimeError("this process was started without a Polar client")
        return self.polar

    async def close(self) -> None:
        if self.polar is not None:
            await self.polar.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()
