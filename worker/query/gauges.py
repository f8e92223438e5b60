"""The state-derived gauges: one round of database and Redis reads. The metrics server
(`worker.platform.serving.metrics_running`) runs it when scraped, at most once per
METRICS_REFRESH_SECONDS however often that is. Failures leave the previous values in place."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import func, select
from sqlmodel import col

from worker.models import Seat, SyncRun, utcnow
from worker.platform.metrics import (
    BUDGET_LEFT,
    DELIVERIES_PENDING,
    LAST_FULL_RESYNC,
    OLDEST_PENDING,
    QUEUE_DEPTH,
    SEATS,
)
from worker.query.inbox import pending_deliveries
from worker.queue import QUEUE_NAME

if TYPE_CHECKING:
    from arq.connections import ArqRedis
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from worker.polar.budget import RedisBudget

log = structlog.get_logger("worker.query.gauges")


async def refresh(
    sessions: async_sessionmaker[AsyncSession],
    *,
    redis: ArqRedis | None = None,
    budget: RedisBudget | None = None,
) -> None:
    """Read the state-derived gauges. Failures leave the previous values in place."""
    try:
        async with sessions() as session:
            pending = await pending_deliveries(session)
            by_status = (
                await session.execute(
                    select(col(Seat.status), func.count())
                    .where(col(Seat.gone_at).is_(None))
                    .group_by(col(Seat.status))
                )
            ).all()
            last_full = (
                await session.execute(
                    select(func.max(SyncRun.finished_at)).where(
                        col(SyncRun.kind) == "full", col(SyncRun.status) == "ok"
                    )
                )
            ).scalar_one_or_none()
    except Exception as exc:  # a scrape must answer even when the database is down
        log.warning("metrics_refresh_failed", error=type(exc).__name__)
        return
    DELIVERIES_PENDING.set(int(pending[0]))
    oldest = pending[1]
    OLDEST_PENDING.set((utcnow() - oldest).total_seconds() if oldest is not None else 0)
    counts = {str(s): int(n) for s, n in by_status}
    for status in ("pending", "claimed", "revoked"):
        SEATS.labels(status=status).set(counts.get(status, 0))
    LAST_FULL_RESYNC.set(last_full.timestamp() if last_full is not None else 0)
    if redis is not None:
        with contextlib.suppress(Exception):
            QUEUE_DEPTH.set(int(await redis.zcard(QUEUE_NAME)))
    if budget is not None:
        with contextlib.suppress(Exception):
            BUDGET_LEFT.set(max(0, budget.per_minute - await budget.used()))
