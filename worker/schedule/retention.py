"""Retention: what the mirror forgets, and when, so that a long-running mirror stays small.

What is kept, and why:

- `webhook_delivery` (and its `webhook_delivery_scope` rows): a processed delivery is
  deleted whole WEBHOOK_RETENTION_DAYS (default 7) after it was received. The row exists
  for two reasons: the sweeper re-requests a sync for a delivery not yet processed (those
  are never deleted, whatever their age), and dedupe on `webhook-id`, which matters while
  Polar may still send the same event again: Polar retries a failed delivery for about 34
  minutes, so a week of ids is ample. A redelivery after that (someone pressing
  "redeliver" in Polar's dashboard) is taken as new, and only costs one more sync: a
  webhook is a doorbell, never the truth. Deleting the whole row, rather than nulling its
  payload, keeps the table bounded by the window, not by the mirror's age.
- `sync_run` and its `resync_item` rows: deleted SYNC_RUN_RETENTION_DAYS (default 30) after
  the run started, once finished. Never deleted: a run still running (a full pass that was
  killed resumes from its items), the latest full pass (the schedule computes the next one
  from it) and the latest successful one (the last-full-resync gauge).
- `seat_change` is the history people ask about ("who lost access?"): kept for ever unless
  SEAT_CHANGE_RETENTION_DAYS is set. The newest row is always kept, whatever its age: on
  SQLite an id is the largest id plus one, so deleting the newest row would hand its id
  out again, and a change-feed consumer past it would miss the new row.

Deletes run in small batches, each its own short transaction, with a pause between them:
on SQLite a batch holds the one write lock for a few milliseconds, and the receiver's
inserts, waiting on the busy timeout, get it between batches (bench/retention_soak.py
measures that pause).
"""

# ruff: noqa: S608 - statements joined from this module's constant fragments; values are bound

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from worker.models import utcnow
from worker.platform.db import retry_transaction

if TYPE_CHECKING:
    from worker.config import Settings

log = structlog.get_logger("worker.schedule.retention")

# Rows per delete: tens of milliseconds of SQLite's write lock at most (a batch of
# deliveries frees ~350 KB of payload pages; bench/retention_soak.py measures the wait).
BATCH = 200
# Between two batches: long enough for a writer waiting on SQLite's busy handler (which
# polls at growing intervals, up to 100 ms) to take the lock first.
PAUSE_S = 0.1

TABLES = ("webhook_delivery", "webhook_delivery_scope", "sync_run", "resync_item", "seat_change")


@dataclass(frozen=True, kw_only=True)
class Retention:
    """How long each kind of row is kept."""

    webhooks: timedelta
    sync_runs: timedelta
    seat_changes: timedelta | None
    """None: seat_change is kept for ever."""

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        days = settings.seat_change_retention_days
        return cls(
            webhooks=timedelta(days=settings.webhook_retention_days),
            sync_runs=timedelta(days=settings.sync_run_retention_days),
            seat_changes=timedelta(days=days) if days is not None else None,
        )


@dataclass
class PruneReport:
    """Rows deleted per table (or that would be, in a dry run)."""

    dry_run: bool
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    seconds: float = 0.0


Sessions = async_sessionmaker[AsyncSession]
Pause = Callable[[float], Awaitable[None]]


def _ts(session: AsyncSession, moment: datetime) -> Any:
    """A moment as the stored timestamps compare (SQLite: naive UTC text)."""
    if session.get_bind().dialect.name == "sqlite":
        return moment.replace(tzinfo=None).isoformat(" ", "microseconds")
    return moment


async def _scalar(sessions: Sessions, sql: str, params: dict[str, Any]) -> int:
    async with sessions() as session:
        bound = {k: _ts(session, v) if isinstance(v, datetime) else v for k, v in params.items()}
        return int((await session.execute(text(sql), bound)).scalar_one() or 0)


# ---------------------------------------------------------------------- webhook deliveries

_OLD_DELIVERIES = "FROM webhook_delivery WHERE processed_at IS NOT NULL AND received_at < :cutoff"


async def _delete_deliveries(session: AsyncSession, cutoff: datetime, batch: int) -> list[int]:
    ids = (
        (
            await session.execute(
                text(f"SELECT webhook_id {_OLD_DELIVERIES} LIMIT :n"),
                {"cutoff": _ts(session, cutoff), "n": batch},
            )
        )
        .scalars()
        .all()
    )
    if not ids:
        return [0, 0]
    chosen = {f"w{i}": webhook_id for i, webhook_id in enumerate(ids)}
    listed = ", ".join(f":{name}" for name in chosen)
    scopes = await session.execute(
        text(f"DELETE FROM webhook_delivery_scope WHERE webhook_id IN ({listed})"),
        chosen,
    )
    deliveries = await session.execute(
        text(f"DELETE FROM webhook_delivery WHERE webhook_id IN ({listed})"),
        chosen,
    )
    return [_count(deliveries), _count(scopes)]


def _count(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


# ---------------------------------------------------------------------- sync runs

# Runs that may go: finished, started before the cutoff, and neither the latest full pass
# nor the latest successful one.
_OLD_RUNS = (
    "FROM sync_run WHERE finished_at IS NOT NULL AND started_at < :cutoff "
    "AND id <> COALESCE((SELECT max(id) FROM sync_run WHERE kind = 'full'), 0) "
    "AND id <> COALESCE((SELECT max(id) FROM sync_run WHERE kind = 'full' "
    "AND status = 'ok'), 0)"
)


async def _delete_items(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    """One batch of resync_item rows of one full pass that may go."""
    run = (
        await session.execute(
            text(
                f"SELECT min(id) {_OLD_RUNS} AND kind = 'full' "
                "AND EXISTS (SELECT 1 FROM resync_item WHERE run_id = sync_run.id)"
            ),
            {"cutoff": _ts(session, cutoff)},
        )
    ).scalar_one_or_none()
    if run is None:
        return 0
    deleted = await session.execute(
        text(
            "DELETE FROM resync_item WHERE run_id = :run AND scope_id IN "
            "(SELECT scope_id FROM resync_item WHERE run_id = :run LIMIT :n)"
        ),
        {"run": run, "n": batch},
    )
    return _count(deleted)


async def _delete_runs(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    """One batch of sync_run rows that may go (a full pass only once its items are gone)."""
    deleted = await session.execute(
        text(
            f"DELETE FROM sync_run WHERE id IN (SELECT id {_OLD_RUNS} "
            "AND NOT EXISTS (SELECT 1 FROM resync_item WHERE run_id = sync_run.id) "
            "ORDER BY id LIMIT :n)"
        ),
        {"cutoff": _ts(session, cutoff), "n": batch},
    )
    return _count(deleted)


# ---------------------------------------------------------------------- seat changes

# The newest row stays: see the module docstring.
_OLD_CHANGES = (
    "FROM seat_change WHERE observed_at < :cutoff AND id < (SELECT max(id) FROM seat_change)"
)


async def _delete_changes(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    deleted = await session.execute(
        text(
            f"DELETE FROM seat_change WHERE id IN (SELECT id {_OLD_CHANGES} ORDER BY id LIMIT :n)"
        ),
        {"cutoff": _ts(session, cutoff), "n": batch},
    )
    return _count(deleted)


# ---------------------------------------------------------------------- pruning


async def would_prune(sessions: Sessions, retention: Retention, *, now: datetime) -> PruneReport:
    """What `prune` would delete now, per table, deleting nothing."""
    report = PruneReport(dry_run=True)
    webhooks = {"cutoff": now - retention.webhooks}
    runs = {"cutoff": now - retention.sync_runs}
    report.rows["webhook_delivery"] = await _scalar(
        sessions, f"SELECT count(*) {_OLD_DELIVERIES}", webhooks
    )
    report.rows["webhook_delivery_scope"] = await _scalar(
        sessions,
        "SELECT count(*) FROM webhook_delivery_scope WHERE webhook_id IN "
        f"(SELECT webhook_id {_OLD_DELIVERIES})",
        webhooks,
    )
    report.rows["sync_run"] = await _scalar(sessions, f"SELECT count(*) {_OLD_RUNS}", runs)
    report.rows["resync_item"] = await _scalar(
        sessions,
        f"SELECT count(*) FROM resync_item WHERE run_id IN (SELECT id {_OLD_RUNS})",
        runs,
    )
    if retention.seat_changes is not None:
        report.rows["seat_change"] = await _scalar(
            sessions,
            f"SELECT count(*) {_OLD_CHANGES}",
            {"cutoff": now - retention.seat_changes},
        )
    return report


async def prune(
    sessions: Sessions,
    retention: Retention,
    *,
    now: datetime | None = None,
    batch: int = BATCH,
    pause: float = PAUSE_S,
    sleep: Pause = asyncio.sleep,
) -> PruneReport:
    """Delete what retention lets go, batch by batch (each its own transaction)."""
    now = now or utcnow()
    loop = asyncio.get_running_loop()
    started = loop.time()
    report = PruneReport(dry_run=False)

    async def drain(step: Callable[[AsyncSession], Awaitable[list[int]]], *tables: str) -> None:
        while True:
            counts = await retry_transaction(sessions, step)
            for table, n in zip(tables, counts, strict=True):
                report.rows[table] += n
            if not any(counts):
                return
            await sleep(pause)

    async def deliveries(session: AsyncSession) -> list[int]:
        return await _delete_deliveries(session, now - retention.webhooks, batch)

    async def items(session: AsyncSession) -> list[int]:
        return [await _delete_items(session, now - retention.sync_runs, batch)]

    async def runs(session: AsyncSession) -> list[int]:
        return [await _delete_runs(session, now - retention.sync_runs, batch)]

    await drain(deliveries, "webhook_delivery", "webhook_delivery_scope")
    await drain(items, "resync_item")
    await drain(runs, "sync_run")
    if retention.seat_changes is not None:
        cutoff = now - retention.seat_changes

        async def changes(session: AsyncSession) -> list[int]:
            return [await _delete_changes(session, cutoff, batch)]

        await drain(changes, "seat_change")
    report.seconds = loop.time() - started
    return report


async def prune_job(ctx: dict[str, Any]) -> str:
    """Cron, daily: prune the mirror (see the module docstring). The worker's resources
    are in ctx["services"], as for every job."""
    resources = ctx["services"]
    report = await prune(resources.sessions, Retention.of(resources.settings))
    log.info("mirror_pruned", seconds=round(report.seconds, 1), **report.rows)
    return ", ".join(f"{table} {n}" for table, n in report.rows.items())
