"""Retention soak: does a long-running SQLite mirror stay small, and does pruning block the
receiver?

A migrated SQLite mirror is fed, day by day on a simulated clock, what WEBHOOKS_PER_DAY
webhooks leave behind (rows written directly, with realistic payload sizes and
timestamps): per webhook one `webhook_delivery` (a CustomerSeat or Subscription event,
~1.1 KB or ~3 KB of JSON), one `webhook_delivery_scope`, one scope `sync_run` and one
`seat_change`; per full resync (4 a day) one `sync_run`, one `resync_item` and one scope
`sync_run` per scope. At the end of each day the real `worker.schedule.retention.prune`
runs with the default windows (7 days of deliveries, 30 of runs, history kept), as the
daily cron does. Freed pages are reused by later inserts (SQLite's freelist): no VACUUM.

Two figures beside references measured in the same run:
1. size: the file (page_count x page_size, after a WAL checkpoint) each day with daily
   pruning, against the same days without pruning, and after a VACUUM at the end;
2. the receiver's longest wait: a thread inserting one webhook_delivery per ~5 ms in its
   own write transaction (as the receiver's inbox does), while the last day's prune runs,
   and while a catch-up prune (a mirror never pruned, DAYS of rows) runs; against the same
   inserts with no prune running.

    .venv/bin/python -m bench.retention_soak [--days 30] [--per-day 10000] [--scopes 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import Figure, percentile, report
from worker.platform.db import (
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_POLLED_BUSY_TIMEOUT_MS,
    create_engine,
    session_factory,
)
from worker.platform.migrate import upgrade
from worker.schedule import retention

START = datetime(2026, 1, 1, tzinfo=UTC)
PASSES_PER_DAY = 4
# What the webhook receiver polls the SQLite write lock at (worker.intake.receiver).
RECEIVER_POLL_S = 0.003


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def seat_payload(rng: random.Random, n: int) -> str:
    seat = {
        "id": f"{rng.getrandbits(128):032x}",
        "created_at": "2026-01-01T00:00:00Z",
        "modified_at": "2026-01-02T00:00:00Z",
        "subscription_id": f"{rng.getrandbits(128):032x}",
        "order_id": None,
        "status": "claimed",
        "customer_id": f"{rng.getrandbits(128):032x}",
        "member_id": f"{rng.getrandbits(128):032x}",
        "member": {
            "id": f"{rng.getrandbits(128):032x}",
            "created_at": "2026-01-01T00:00:00Z",
            "modified_at": None,
            "customer_id": f"{rng.getrandbits(128):032x}",
            "email": f"person{n}@example.com",
            "name": f"Person {n}",
            "external_id": None,
            "role": "member",
        },
        "email": f"person{n}@example.com",
        "customer_email": "billing@example.com",
        "invitation_token_expires_at": "2026-01-02T00:00:00Z",
        "claimed_at": "2026-01-01T01:00:00Z",
        "revoked_at": None,
        "seat_metadata": {"team": "blue", "cost_center": "cc-42"},
    }
    return json.dumps(
        {
            "type": "customer_seat.claimed",
            "timestamp": "2026-01-01T01:00:00Z",
            "api_version": "2026-10",
            "data": seat,
        }
    )


def subscription_payload(rng: random.Random) -> str:
    base = json.loads(seat_payload(rng, 0))["data"]
    data = {
        **{k: base[k] for k in ("id", "created_at", "modified_at", "customer_id")},
        "status": "active",
        "seats": 25,
        "amount": 25000,
        "currency": "usd",
        "recurring_interval": "month",
        "current_period_start": "2026-01-01T00:00:00Z",
        "current_period_end": "2026-02-01T00:00:00Z",
        "customer": {
            "id": base["customer_id"],
            "email": "billing@example.com",
            "name": "Acme",
            "metadata": {},
            "billing_address": {"country": "US", "line1": "1 Main St"},
        },
        "product": {
            "id": base["member_id"],
            "name": "Team plan",
            "description": "x" * 400,
            "prices": [
                {
                    "id": base["id"],
                    "amount_type": "seat_based",
                    "price_currency": "usd",
                    "seat_tiers": [{"min_seats": 1}],
                }
            ],
        },
        "metadata": {"source": "web"},
        "pending_update": None,
    }
    return json.dumps(
        {
            "type": "subscription.updated",
            "timestamp": "2026-01-01T01:00:00Z",
            "api_version": "2026-10",
            "data": data,
        }
    )


class Mirror:
    """The SQLite file, written with the standard library in the columns' stored forms."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def feed_day(self, day: int, per_day: int, scopes: list[str], rng: random.Random) -> None:
        begin = START + timedelta(days=day)
        deliveries, routed, runs, changes = [], [], [], []
        for n in range(per_day):
            at = begin + timedelta(seconds=86_400 * n / per_day)
            webhook_id = f"msg_{day:03d}_{n:06d}"
            payload = subscription_payload(rng) if n % 5 == 0 else seat_payload(rng, n)
            scope = scopes[rng.randrange(len(scopes))]
            done = stamp(at + timedelta(seconds=2))
            deliveries.append(
                (
                    webhook_id,
                    payload.split('"', 4)[3],
                    stamp(at),
                    payload,
                    stamp(at),
                    done,
                    "synced",
                )
            )
            routed.append((webhook_id, "subscription", scope, stamp(at), done))
            runs.append(("scope", "webhook", "subscription", scope, "ok", stamp(at), done, 1))
            changes.append(
                (
                    f"seat_{rng.randrange(10 * len(scopes))}",
                    "subscription",
                    scope,
                    done,
                    "status",
                    "pending",
                    "claimed",
                    f"p{n}@example.com",
                    f"p{n}@example.com",
                )
            )
        items, full = [], []
        for k in range(PASSES_PER_DAY):
            at = begin + timedelta(hours=24 * k / PASSES_PER_DAY)
            full.append(
                (
                    "full",
                    "cron",
                    None,
                    None,
                    "ok",
                    stamp(at),
                    stamp(at + timedelta(minutes=8)),
                    len(scopes) + 20,
                )
            )
            for m, scope in enumerate(scopes):
                synced = stamp(at + timedelta(seconds=m * 480 / len(scopes)))
                runs.append(("scope", "cron", "subscription", scope, "ok", synced, synced, 1))
        c = self.conn
        c.execute("BEGIN")
        c.executemany(
            "INSERT INTO webhook_delivery (webhook_id, event_type, event_timestamp, payload, "
            "received_at, processed_at, outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
            deliveries,
        )
        c.executemany(
            "INSERT INTO webhook_delivery_scope (webhook_id, scope_kind, scope_id, received_at, "
            "processed_at) VALUES (?, ?, ?, ?, ?)",
            routed,
        )
        insert_run = (
            "INSERT INTO sync_run (kind, trigger, scope_kind, scope_id, status, started_at, "
            "finished_at, api_calls, scopes_seen, inserted, updated, unchanged, gone, errors) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 0, 0)"
        )
        c.executemany(insert_run, runs)
        for row in full:
            run_id = c.execute(insert_run, row).lastrowid
            items.extend((run_id, "subscription", scope, row[6], "ok") for scope in scopes)
        c.executemany(
            "INSERT INTO resync_item (run_id, kind, scope_id, done_at, outcome) "
            "VALUES (?, ?, ?, ?, ?)",
            items,
        )
        c.executemany(
            "INSERT INTO seat_change (seat_id, scope_kind, scope_id, observed_at, change, "
            "old_status, new_status, old_email, new_email) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            changes,
        )
        c.execute("COMMIT")

    def size(self) -> tuple[int, int]:
        """(bytes in the file after a checkpoint, bytes on its freelist)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = self.conn.execute("PRAGMA page_size").fetchone()[0]
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * page, free * page

    def rows(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608


async def prune(path: Path, now: datetime, *, pause: float) -> retention.PruneReport:
    engine = create_engine(f"sqlite:///{path}")
    try:
        return await retention.prune(
            session_factory(engine),
            retention.Retention(
                webhooks=timedelta(days=7), sync_runs=timedelta(days=30), seat_changes=None
            ),
            now=now,
            pause=pause,
        )
    finally:
        await engine.dispose()


class Receiver(threading.Thread):
    """Inserts one delivery every `every` seconds, each in its own BEGIN IMMEDIATE
    transaction, timing each, and waits for the write lock as the webhook receiver does:
    it polls every RECEIVER_POLL_S (`create_engine(lock_poll_seconds=...)`), with SQLite's
    own busy handler cut to SQLITE_POLLED_BUSY_TIMEOUT_MS."""

    def __init__(self, path: Path, *, every: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.conn = sqlite3.connect(
            path,
            isolation_level=None,
            timeout=SQLITE_POLLED_BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
        )
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.every = every
        self.waits: list[float] = []
        self.stop = threading.Event()
        self.payload = seat_payload(random.Random(1), 1)
        self.tag = uuid.uuid4().hex[:8]

    def _begin(self) -> None:
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "database is locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(RECEIVER_POLL_S)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            at = stamp(datetime.now(UTC))
            started = time.perf_counter()
            self._begin()
            self.conn.execute(
                "INSERT INTO webhook_delivery (webhook_id, event_type, payload, received_at) "
                "VALUES (?, 'customer_seat.claimed', ?, ?)",
                (f"live_{self.tag}_{n}", self.payload, at),
            )
            self.conn.execute("COMMIT")
            self.waits.append((time.perf_counter() - started) * 1000)
            time.sleep(self.every)
        self.conn.close()


def while_receiving(path: Path, work: Any) -> tuple[Any, list[float], float]:
    """Run `work()` with a receiver inserting beside it: (its result, insert ms, seconds)."""
    receiver = Receiver(path)
    receiver.start()
    time.sleep(0.2)
    started = time.perf_counter()
    result = work()
    elapsed = time.perf_counter() - started
    receiver.stop.set()
    receiver.join()
    return result, receiver.waits, elapsed


def over(waits: list[float], ms: float = 250.0) -> str:
    return f"{sum(w > ms for w in waits)} > {ms:g} ms"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=10_000)
    parser.add_argument("--scopes", type=int, default=2_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pss_soak_"))
    pruned_path, kept_path = work / "pruned.db", work / "kept.db"
    for path in (pruned_path, kept_path):
        upgrade(f"sqlite:///{path}")
    pruned, kept = Mirror(pruned_path), Mirror(kept_path)
    rng = random.Random(11)
    scopes = [f"{rng.getrandbits(128):032x}" for _ in range(args.scopes)]
    sizes: list[dict[str, Any]] = []
    last: tuple[retention.PruneReport, list[float], float] | None = None
    for day in range(args.days):
        pruned.feed_day(day, args.per_day, scopes, random.Random(day))
        kept.feed_day(day, args.per_day, scopes, random.Random(day))
        end = START + timedelta(days=day + 1)
        if day == args.days - 1:
            last = while_receiving(
                pruned_path,
                lambda end=end: asyncio.run(prune(pruned_path, end, pause=retention.PAUSE_S)),
            )
        else:
            asyncio.run(prune(pruned_path, end, pause=0))
        size, free = pruned.size()
        sizes.append({"day": day + 1, "pruned": size, "free": free, "kept": kept.size()[0]})
        unpruned = mb(sizes[-1]["kept"])
        print(f"day {day + 1:3d}: pruned {mb(size)} ({mb(free)} free), unpruned {unpruned}")
    assert last is not None
    last_report, last_waits, last_seconds = last
    rows = {t: pruned.rows(t) for t in retention.TABLES}

    quiet = while_receiving(kept_path, lambda: time.sleep(5))[1]
    end = START + timedelta(days=args.days)
    catch_up, catch_waits, catch_seconds = while_receiving(
        kept_path, lambda: asyncio.run(prune(kept_path, end, pause=retention.PAUSE_S))
    )
    after_catch_up, catch_free = kept.size()
    pruned.conn.execute("VACUUM")
    vacuumed, _ = pruned.size()
    peak = max(s["pruned"] for s in sizes)
    figures = [
        Figure(
            "file size, day " + str(args.days) + ", pruned daily (MB)",
            round(sizes[-1]["pruned"] / 1e6, 1),
            f"unpruned: {mb(sizes[-1]['kept'])}; after VACUUM: {mb(vacuumed)}",
        ),
        Figure(
            "largest size over the run, pruned daily (MB)",
            round(peak / 1e6, 1),
            "freelist reuse, no VACUUM",
        ),
        Figure("rows kept at the end", json.dumps(rows), f"fed {args.per_day:,}/day"),
        Figure(
            "receiver insert, longest wait during the daily prune (ms)",
            round(max(last_waits), 1),
            f"p99 {percentile(last_waits, 99):.1f}, median "
            f"{statistics.median(last_waits):.1f}, {over(last_waits)} of {len(last_waits)} "
            f"inserts; no prune: max {max(quiet):.1f}, p99 {percentile(quiet, 99):.1f}, "
            f"{over(quiet)}",
        ),
        Figure(
            "daily prune: rows deleted, seconds",
            json.dumps(last_report.rows),
            f"{last_seconds:.1f} s",
        ),
        Figure(
            "receiver insert, longest wait during a catch-up prune (ms)",
            round(max(catch_waits), 1),
            f"p99 {percentile(catch_waits, 99):.1f}, {over(catch_waits)} of "
            f"{len(catch_waits)} inserts; {sum(catch_up.rows.values()):,} rows in "
            f"{catch_seconds:.1f} s",
        ),
        Figure(
            "catch-up prune: file size after (MB)",
            round(after_catch_up / 1e6, 1),
            f"before: {mb(sizes[-1]['kept'])}; {mb(catch_free)} of it free for reuse",
        ),
    ]
    report("retention_soak", figures, {"sizes": sizes, "args": vars(args), "dir": str(work)})
    for path in work.iterdir():
        path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
