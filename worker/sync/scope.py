"""Sync one scope: fetch Polar's authoritative seat list, reconcile it, record a sync_run."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.models import SyncRun, utcnow
from worker.platform import metrics
from worker.platform.db import retry_transaction
from worker.polar.errors import Lane, NotFoundError, PolarError, PolarMisconfiguredError
from worker.polar.schemas import SeatsList
from worker.resources import PolarResources, Resources
from worker.sync.reconcile import ReconcileResult, mark_scope_gone, reconcile_scope, record_failure

log = structlog.get_logger("worker.sync.scope")


@dataclass
class SyncOutcome:
    run_id: int
    kind: str
    scope_id: str
    status: str  # ok | stale | gone | failed
    result: ReconcileResult | None


async def _start_run(
    resources: Resources, *, kind: str, scope_id: str, trigger: str, job_id: str | None
) -> int:
    async def work(session: AsyncSession) -> int:
        run = SyncRun(
            kind="scope",
            trigger=trigger,
            scope_kind=kind,
            scope_id=scope_id,
            started_at=utcnow(),
            job_id=job_id,
            api_calls=1,
        )
        session.add(run)
        await session.flush()
        assert run.id is not None
        return run.id

    return await retry_transaction(resources.sessions, work)


async def _finish_failed(
    resources: Resources, *, run_id: int, kind: str, scope_id: str, error: str
) -> None:
    async def work(session: AsyncSession) -> None:
        now = utcnow()
        run = await session.get(SyncRun, run_id)
        if run is not None and run.finished_at is not None:
            return  # cancelled just after its reconcile committed: the run succeeded
        await record_failure(session, kind=kind, scope_id=scope_id, error=error, now=now)
        if run is not None:
            run.status, run.error, run.finished_at, run.errors = "failed", error[:2000], now, 1

    await retry_transaction(resources.sessions, work)


async def sync_scope(
    resources: PolarResources,
    *,
    kind: str,
    scope_id: str,
    trigger: str = "manual",
    lane: Lane = "webhook",
    job_id: str | None = None,
) -> SyncOutcome:
    """Fetch, then reconcile in one transaction. Polar errors are recorded and re-raised.

    Only Polar's own `ResourceNotFound` marks the scope gone; a 404 without an error code
    (PolarMisconfiguredError) is recorded as a failure and leaves the scope and its seats as
    they were."""
    bound = log.bind(scope_kind=kind, scope_id=scope_id, trigger=trigger, job_id=job_id)
    run_id = await _start_run(
        resources, kind=kind, scope_id=scope_id, trigger=trigger, job_id=job_id
    )
    try:
        return await _fetch_and_reconcile(resources, bound, run_id, kind, scope_id, lane)
    except asyncio.CancelledError:
        # Job timeout or shutdown: leave a record rather than a run stuck in `running`.
        await asyncio.shield(
            _finish_failed(
                resources, run_id=run_id, kind=kind, scope_id=scope_id, error="cancelled"
            )
        )
        raise


async def _fetch_and_reconcile(
    resources: PolarResources, bound: Any, run_id: int, kind: str, scope_id: str, lane: Lane
) -> SyncOutcome:
    polar = resources.polar
    # Freshness is measured from when the request left, not from before the wait for the
    # rate budget: a fetch that waited there reads Polar later than one started after it.
    sent: list[datetime] = []
    try:
        seats: SeatsList = await polar.list_scope_seats(kind, scope_id, lane=lane, sent_at=sent)
    except NotFoundError:
        fetch_started_at = sent[-1]

        async def gone(session: AsyncSession) -> None:
            now = utcnow()
            await mark_scope_gone(
                session,
                kind=kind,
                scope_id=scope_id,
                fetch_started_at=fetch_started_at,
                now=now,
                sync_run_id=run_id,
            )
            run = await session.get(SyncRun, run_id)
            if run is not None:
                run.status, run.finished_at, run.error = "gone", now, "not found in Polar (404)"

        await retry_transaction(resources.sessions, gone)
        metrics.SYNCS.labels(outcome="gone").inc()
        bound.warning("scope_gone")
        return SyncOutcome(run_id, kind, scope_id, "gone", None)
    except PolarError as exc:
        await _finish_failed(resources, run_id=run_id, kind=kind, scope_id=scope_id, error=str(exc))
        metrics.SYNCS.labels(outcome="failed").inc()
        if isinstance(exc, PolarMisconfiguredError):
            bound.error("sync_polar_misconfigured", error=str(exc))
        else:
            bound.warning("sync_failed", error=str(exc), error_class=type(exc).__name__)
        raise
    fetch_started_at = sent[-1]

    async def apply(session: AsyncSession) -> ReconcileResult:
        now = utcnow()
        result = await reconcile_scope(
            session,
            kind=kind,
            scope_id=scope_id,
            seats=seats,
            fetch_started_at=fetch_started_at,
            now=now,
            sync_run_id=run_id,
        )
        run = await session.get(SyncRun, run_id)
        if run is not None:
            run.status = "stale" if result.stale else "ok"
            run.finished_at = now
            run.scopes_seen = 1
            run.inserted, run.updated = result.inserted, result.updated
            run.unchanged, run.gone = result.unchanged, result.gone
        return result

    with metrics.RECONCILE_SECONDS.time():
        result = await retry_transaction(resources.sessions, apply)
    status = "stale" if result.stale else "ok"
    metrics.SYNCS.labels(outcome=status).inc()
    bound.info(
        "scope_synced",
        status=status,
        inserted=result.inserted,
        updated=result.updated,
        unchanged=result.unchanged,
        gone=result.gone,
        seats=len(seats.seats),
    )
    return SyncOutcome(run_id, kind, scope_id, status, result)


async def abandon_stale_runs(resources: Resources, *, older_than: timedelta) -> int:
    """Close scope runs left `running` by a worker that was killed (kill -9 leaves no
    chance to record anything); the scope itself is re-synced by the inbox sweep."""

    async def work(session: AsyncSession) -> int:
        now = utcnow()
        result = await session.execute(
            update(SyncRun)
            .where(
                col(SyncRun.kind) == "scope",
                col(SyncRun.finished_at).is_(None),
                col(SyncRun.started_at) < now - older_than,
            )
            .values(status="abandoned", finished_at=now, error="worker died or timed out")
        )
        return int(getattr(result, "rowcount", 0) or 0)

    return await retry_transaction(resources.sessions, work)
