"""`seat-sync status`: is the mirror keeping up? Last full resyncs, failing scopes, the
inbox backlog, queue depth and rate budget (when a Redis is reachable), invitation work, and
what to check when Polar's answers say the configuration is wrong."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.config import Settings
from worker.models import InvitationReminder, InvitationRenewal, SeatScope, SyncRun, utcnow
from worker.polar.errors import CHECK_CONFIGURATION
from worker.query.inbox import pending_deliveries
from worker.query.mirror import reading, running_redis_url

RECENT_PASSES = 5
FAILING_SHOWN = 20


async def _recent_passes(session: AsyncSession) -> Sequence[SyncRun]:
    """The last full resyncs, newest first."""
    query = (
        select(SyncRun)
        .where(col(SyncRun.kind) == "full")
        .order_by(col(SyncRun.id).desc())
        .limit(RECENT_PASSES)
    )
    return (await session.execute(query)).scalars().all()


async def _failing_scopes(session: AsyncSession) -> Sequence[SeatScope]:
    """Scopes whose last syncs failed, most failures first."""
    query = (
        select(SeatScope)
        .where(col(SeatScope.consecutive_failures) > 0)
        .order_by(col(SeatScope.consecutive_failures).desc())
        .limit(FAILING_SHOWN)
    )
    return (await session.execute(query)).scalars().all()


async def _misconfigured_scopes(session: AsyncSession) -> int:
    """Failing scopes whose last error is Polar's answer to a wrong URL or API version."""
    query = (
        select(func.count())
        .select_from(SeatScope)
        .where(
            col(SeatScope.consecutive_failures) > 0,
            col(SeatScope.last_error).contains(CHECK_CONFIGURATION, autoescape=True),
        )
    )
    return int((await session.execute(query)).scalar_one())


async def _tally(session: AsyncSession, column: Any) -> dict[str, int]:
    """Rows per value of `column` (reminder outcomes, renewal states)."""
    rows = await session.execute(select(column, func.count()).group_by(column))
    return {str(value): int(n) for value, n in rows.all()}


def configuration_problem(
    settings: Settings, failing_scopes: int, last_pass: SyncRun | None
) -> str | None:
    """What to check when Polar answers 404 without an error code (failing scopes now, or
    the last full resync stopped by it)."""
    where = (
        [f"{failing_scopes} scope{'' if failing_scopes == 1 else 's'} failing"]
        if failing_scopes
        else []
    )
    if (
        last_pass is not None
        and last_pass.status == "failed"
        and CHECK_CONFIGURATION in (last_pass.error or "")
    ):
        where.append(f"full resync #{last_pass.id} stopped")
    if not where:
        return None
    return (
        f"Polar answered 404 without an error code ({', '.join(where)}): check POLAR_API_URL "
        f"({settings.polar_api_url}) and POLAR_API_VERSION ({settings.polar_api_version})"
    )


def _pass_json(run: SyncRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "status": run.status,
        "scopes": run.scopes_seen,
        "api_calls": run.api_calls,
        "seats_changed": run.updated,
        "errors": run.errors,
    }


def _age_s(now: datetime, then: datetime | None) -> float | None:
    return round((now - then).total_seconds(), 1) if then is not None else None


async def _redis_figures(settings: Settings) -> tuple[int | None, int | None]:
    """(jobs queued, Polar calls spent in the current rate window) from the fleet's Redis:
    REDIS_URL, or the private Redis when one is serving; (None, None) without one."""
    redis_url = await running_redis_url(settings)
    if redis_url is None:
        return None, None
    from arq.connections import create_pool

    from worker.polar.budget import RedisBudget
    from worker.queue import QUEUE_NAME, redis_settings

    redis = await create_pool(redis_settings(redis_url))
    try:
        budget = RedisBudget(
            redis,
            settings.polar_requests_per_minute,
            window_ms=int(settings.polar_rate_window_seconds * 1000),
        )
        return int(await redis.zcard(QUEUE_NAME)), await budget.used()
    finally:
        await redis.aclose()


async def status_report(settings: Settings) -> dict[str, Any]:
    """The report `seat-sync status` prints (and its JSON): plain values only. Redis-only
    figures (queue depth, rate budget) are None when no Redis is reachable."""
    now = utcnow()
    async with reading(settings) as mirror, mirror.sessions() as session:
        passes = await _recent_passes(session)
        failing = await _failing_scopes(session)
        misconfigured = await _misconfigured_scopes(session)
        pending, oldest = await pending_deliveries(session)
        reminders = await _tally(session, col(InvitationReminder.outcome))
        renewals = await _tally(session, col(InvitationRenewal.state))
    queue_depth, budget_used = await _redis_figures(settings)
    return {
        "polar": {
            "api_url": settings.polar_api_url,
            "api_version": settings.polar_api_version,
            "problem": configuration_problem(
                settings, misconfigured, passes[0] if passes else None
            ),
        },
        "full_resyncs": [_pass_json(p) for p in passes],
        "failing_scopes": [
            {
                "kind": f.kind,
                "scope_id": f.scope_id,
                "consecutive_failures": f.consecutive_failures,
                "last_error": f.last_error,
            }
            for f in failing
        ],
        "deliveries_pending": pending,
        "oldest_pending_delivery_age_s": _age_s(now, oldest),
        "queue_depth": queue_depth,
        "rate_budget": (
            {"used": budget_used, "limit": settings.polar_requests_per_minute}
            if budget_used is not None
            else None
        ),
        "reminders": reminders,
        "renewals": renewals,
    }
