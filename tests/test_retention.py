"""Retention: `seat-sync prune [--dry-run]` and the daily cron forget processed webhook
payloads, old sync runs and (only when asked) old history, and never what is still needed:
unprocessed deliveries, a running pass, the latest full pass, the newest history row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.commands import seat_sync
from worker.models import (
    ResyncItem,
    SeatChange,
    SyncRun,
    WebhookDelivery,
    WebhookDeliveryScope,
)
from worker.resources import WorkerResources
from worker.schedule import retention

NOW = datetime.now(UTC)
DAY = timedelta(days=1)


def delivery(webhook_id: str, age: timedelta, *, processed: bool = True) -> dict[str, Any]:
    received = NOW - age
    return {
        "webhook_id": webhook_id,
        "event_type": "customer_seat.claimed",
        "payload": '{"type": "customer_seat.claimed", "data": {}}' + " " * 1500,
        "received_at": received,
        "processed_at": received + timedelta(seconds=2) if processed else None,
        "outcome": "synced" if processed else None,
    }


def run(
    run_id: int, kind: str, age: timedelta, status: str = "ok", *, finished: bool = True
) -> dict[str, Any]:
    started = NOW - age
    return {
        "id": run_id,
        "kind": kind,
        "trigger": "cron" if kind == "full" else "webhook",
        "status": status,
        "started_at": started,
        "finished_at": started + timedelta(minutes=5) if finished else None,
    }


def change(age: timedelta, seat: str = "seat_1") -> dict[str, Any]:
    return {
        "seat_id": seat,
        "scope_kind": "subscription",
        "scope_id": "sub_1",
        "observed_at": NOW - age,
        "change": "status",
        "old_status": "pending",
        "new_status": "claimed",
    }


async def seed(engine: AsyncEngine) -> None:
    """A mirror with rows on both sides of every retention window (defaults: 7 and 30 days)."""
    async with engine.begin() as conn:
        await conn.execute(
            insert(WebhookDelivery),
            [
                delivery("old-1", 8 * DAY),
                delivery("old-2", 9 * DAY),
                delivery("old-3", 30 * DAY),
                delivery("old-unprocessed", 20 * DAY, processed=False),
                delivery("recent-1", 6 * DAY),
                delivery("recent-2", timedelta(minutes=5)),
            ],
        )
        await conn.execute(
            insert(WebhookDeliveryScope),
            [
                {
                    "webhook_id": webhook_id,
                    "scope_kind": "subscription",
                    "scope_id": scope,
                    "received_at": NOW - 8 * DAY,
                }
                for webhook_id, scope in (
                    ("old-1", "sub_1"),
                    ("old-1", "sub_2"),
                    ("old-2", "sub_1"),
                    ("recent-1", "sub_1"),
                )
            ],
        )
        await conn.execute(
            insert(SyncRun),
            [
                run(1, "scope", 40 * DAY),
                run(2, "scope", 35 * DAY, "failed"),
                run(3, "scope", 31 * DAY),
                run(4, "scope", 31 * DAY, "running", finished=False),  # kept: not finished
                run(5, "scope", 2 * DAY),
                run(10, "full", 45 * DAY),  # goes, with its items
                run(11, "full", 40 * DAY),  # kept: the latest successful pass
                run(12, "full", 39 * DAY, "failed"),  # goes, with its items
                run(13, "full", 38 * DAY, "running", finished=False),  # kept: the latest pass
            ],
        )
        await conn.execute(
            insert(ResyncItem),
            [
                {"run_id": run_id, "kind": "subscription", "scope_id": f"sub_{n}"}
                for run_id in (10, 11, 12, 13)
                for n in range(3)
            ],
        )
        await conn.execute(
            insert(SeatChange), [change(60 * DAY), change(50 * DAY), change(45 * DAY)]
        )


async def count(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar_one())


def table_of(out: str) -> dict[str, int]:
    rows = [line.split() for line in out.splitlines()[2:] if line and line[0].isalpha()]
    return {name: int(n) for name, n, *_ in rows if n.isdigit()}


EXPECTED = {
    "webhook_delivery": 3,
    "webhook_delivery_scope": 3,
    "sync_run": 5,
    "resync_item": 6,
    "seat_change": 0,
}


async def test_dry_run_counts_per_table_and_deletes_nothing(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    await seed(engine)

    ran = await seat_sync("prune", "--dry-run", env={"DATABASE_URL": database_url}, cwd=tmp_path)

    assert ran.code == 0, ran.err
    assert "would delete" in ran.out.splitlines()[0]
    assert table_of(ran.out) == EXPECTED
    assert await count(engine, "SELECT count(*) FROM webhook_delivery") == 6
    assert await count(engine, "SELECT count(*) FROM sync_run") == 9


async def test_prune_deletes_what_retention_lets_go_and_keeps_what_is_needed(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    await seed(engine)

    ran = await seat_sync("prune", env={"DATABASE_URL": database_url}, cwd=tmp_path)

    assert ran.code == 0, ran.err
    assert table_of(ran.out) == EXPECTED
    assert "seat_change: kept" in ran.out
    async with engine.connect() as conn:
        deliveries = set((await conn.execute(select(WebhookDelivery.webhook_id))).scalars())
        scopes = set((await conn.execute(select(WebhookDeliveryScope.webhook_id))).scalars())
        runs = set((await conn.execute(select(SyncRun.id))).scalars())
        items = set((await conn.execute(select(ResyncItem.run_id))).scalars())
        changes = (await conn.execute(select(func.count()).select_from(SeatChange))).scalar()
    assert deliveries == {"old-unprocessed", "recent-1", "recent-2"}
    assert scopes == {"recent-1"}
    assert runs == {4, 5, 11, 13}
    assert items == {11, 13}
    assert changes == 3
    again = await seat_sync("prune", "--dry-run", env={"DATABASE_URL": database_url}, cwd=tmp_path)
    assert set(table_of(again.out).values()) == {0}


async def test_seat_change_is_pruned_only_when_asked_and_the_newest_row_stays(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    """Every row is older than the window: all but the newest go, so the next row's id is
    still above every id a change-feed consumer has seen (SQLite hands out max(id) + 1)."""
    await seed(engine)
    env = {"DATABASE_URL": database_url, "SEAT_CHANGE_RETENTION_DAYS": "30"}
    before = await seat_sync("changes", "--format", "ndjson", env=env, cwd=tmp_path)
    cursor = max(json.loads(line)["id"] for line in before.out.splitlines())

    ran = await seat_sync("prune", env=env, cwd=tmp_path)

    assert ran.code == 0, ran.err
    assert table_of(ran.out)["seat_change"] == 2
    async with engine.begin() as conn:
        await conn.execute(insert(SeatChange), [change(timedelta(0), seat="seat_new")])
    after = await seat_sync("changes", "--after", str(cursor), "--format", "json", env=env)
    assert [row["seat_id"] for row in json.loads(after.out)] == ["seat_new"]


async def test_pruning_waits_between_small_batches(engine: AsyncEngine) -> None:
    """Each batch is its own short transaction: the receiver's inserts get the write lock
    between them (the pause, and the batch size, bound how long one waits)."""
    await seed(engine)
    from worker.platform.db import session_factory

    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    report = await retention.prune(
        session_factory(engine),
        retention.Retention(webhooks=7 * DAY, sync_runs=30 * DAY, seat_changes=None),
        batch=2,
        sleep=pause,
    )

    assert report.rows == EXPECTED
    # 3 deliveries in batches of 2, 6 items (3 per pass), 5 runs in batches of 2.
    assert len(pauses) == 2 + 4 + 3
    assert set(pauses) == {retention.PAUSE_S}


async def test_the_worker_prunes_daily(services: WorkerResources, engine: AsyncEngine) -> None:
    from worker.schedule.jobs import build_worker

    await seed(engine)
    worker = build_worker(services.settings, "redis://127.0.0.1:9/0", handle_signals=False)
    [job] = [c for c in worker.cron_jobs if c.name == "prune_mirror"]

    summary = await job.coroutine({"services": services})

    assert (job.hour, job.minute) == (3, 17)
    assert summary.startswith("webhook_delivery 3, webhook_delivery_scope 3, sync_run 5")
    assert await count(engine, "SELECT count(*) FROM sync_run") == 4
