"""Reconcile: initial load and no-op resync of 1 scope x 1,000 seats and 100 scopes x 100
seats into SQLite and PostgreSQL, beside a plain `executemany` upsert of the same seat rows
through the same driver (aiosqlite / asyncpg), each scope in its own transaction.

Times cover the database work only: the seat lists are parsed (`SeatsList`) beforehand,
exactly what `sync_scope` hands to `reconcile_scope` after its fetch.

    .venv/bin/python -m bench.reconcile [--backend sqlite --backend postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosqlite
import asyncpg

from bench.common import Figure, database, report, scalar
from worker.platform.db import create_engine, session_factory, sqlite_path, transaction
from worker.polar.schemas import SeatsList
from worker.sync.reconcile import POLAR_COLUMNS, reconcile_scope, seat_row

SHAPES = {"1x1000": (1, 1000), "100x100": (100, 100)}


def seat_dict(scope_id: str, number: int, now: datetime) -> dict[str, Any]:
    stamp = now.isoformat().replace("+00:00", "Z")
    member_id = str(uuid.uuid4())
    customer_id = f"cus_{scope_id[:8]}"
    email = f"m{number}-{scope_id[:8]}@bench.example"
    return {
        "id": str(uuid.uuid4()),
        "created_at": stamp,
        "modified_at": stamp,
        "subscription_id": scope_id,
        "order_id": None,
        "status": ("claimed", "pending", "revoked")[number % 3],
        "customer_id": customer_id,
        "member_id": member_id,
        "member": {
            "id": member_id,
            "created_at": stamp,
            "modified_at": None,
            "customer_id": customer_id,
            "email": email,
            "name": f"Member {number}",
            "external_id": None,
            "role": "member",
        },
        "email": email,
        "customer_email": "billing@bench.example",
        "invitation_token_expires_at": (now + timedelta(hours=24)).isoformat(),
        "claimed_at": stamp if number % 3 == 0 else None,
        "revoked_at": stamp if number % 3 == 2 else None,
        "seat_metadata": {"team": f"t{number % 7}"},
    }


def make_lists(scopes: int, seats: int) -> dict[str, SeatsList]:
    now = datetime.now(UTC)
    lists = {}
    for _ in range(scopes):
        scope_id = str(uuid.uuid4())
        raw = [seat_dict(scope_id, n, now) for n in range(seats)]
        lists[scope_id] = SeatsList.model_validate(
            {"seats": raw, "total_seats": seats, "available_seats": 0}
        )
    return lists


async def reconcile_all(database_url: str, lists: dict[str, SeatsList]) -> tuple[float, int]:
    """Seconds to reconcile every list (one transaction each) and rows written."""
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    written = 0
    try:
        started = time.perf_counter()
        for scope_id, seats in lists.items():
            fetched = datetime.now(UTC)
            async with transaction(sessions) as session:
                result = await reconcile_scope(
                    session,
                    kind="subscription",
                    scope_id=scope_id,
                    seats=seats,
                    fetch_started_at=fetched,
                    now=datetime.now(UTC),
                )
            written += result.written
        return time.perf_counter() - started, written
    finally:
        await engine.dispose()


COLUMNS = ("id", *POLAR_COLUMNS, "synced_at")


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):  # what UTCDateTime stores on SQLite: naive UTC text
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _pg_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict) else value


def upsert_rows(seats: SeatsList, now: datetime) -> list[dict[str, Any]]:
    return [{**seat_row(s), "synced_at": now} for s in seats.seats]


async def plain_upsert(database_url: str, lists: dict[str, SeatsList]) -> float:
    """The reference: one `executemany` INSERT .. ON CONFLICT DO UPDATE per scope."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
    now = datetime.now(UTC)
    rows = {scope_id: upsert_rows(seats, now) for scope_id, seats in lists.items()}
    if database_url.startswith("sqlite"):
        path = sqlite_path(database_url)
        marks = ", ".join("?" for _ in COLUMNS)
        sql = (
            f"INSERT INTO seat ({', '.join(COLUMNS)}) VALUES ({marks}) "  # noqa: S608
            f"ON CONFLICT (id) DO UPDATE SET {updates}"
        )
        async with aiosqlite.connect(str(path), isolation_level=None) as conn:
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
            started = time.perf_counter()
            for scope_rows in rows.values():
                await conn.execute("BEGIN IMMEDIATE")
                await conn.executemany(
                    sql, [[_sqlite_value(r[c]) for c in COLUMNS] for r in scope_rows]
                )
                await conn.execute("COMMIT")
            return time.perf_counter() - started
    marks = ", ".join(f"${n}" for n in range(1, len(COLUMNS) + 1))
    sql = (
        f"INSERT INTO seat ({', '.join(COLUMNS)}) VALUES ({marks}) "  # noqa: S608
        f"ON CONFLICT (id) DO UPDATE SET {updates}"
    )
    conn = await asyncpg.connect(database_url)
    try:
        started = time.perf_counter()
        for scope_rows in rows.values():
            async with conn.transaction():
                await conn.executemany(
                    sql, [[_pg_value(r[c]) for c in COLUMNS] for r in scope_rows]
                )
        return time.perf_counter() - started
    finally:
        await conn.close()


async def measure(backend: str, shape: str) -> dict[str, Any]:
    scopes, seats = SHAPES[shape]
    lists = make_lists(scopes, seats)
    warm = make_lists(1, 50)
    async with database(backend, "reconcile") as url:
        await reconcile_all(url, warm)  # compile caches, open files: not timed
        initial, written = await reconcile_all(url, lists)
        changes = await scalar(url, "SELECT count(*) FROM seat_change")
        noop, noop_written = await reconcile_all(url, lists)
        changes_after = await scalar(url, "SELECT count(*) FROM seat_change")
    async with database(backend, "reference") as url:
        await plain_upsert(url, warm)
        reference = await plain_upsert(url, lists)
        rows = await scalar(url, "SELECT count(*) FROM seat")
    return {
        "backend": backend,
        "shape": shape,
        "seats": scopes * seats,
        "initial_s": initial,
        "written": written,
        "reference_s": reference,
        "reference_rows": rows - 50,
        "noop_s": noop,
        "noop_written": noop_written,
        "history_rows_added_by_noop": changes_after - changes,
    }


async def main(backends: Sequence[str]) -> None:
    runs = [await measure(b, shape) for b in backends for shape in SHAPES]
    figures: list[Figure] = []
    for run in runs:
        label = f"{run['backend']} {run['shape']}"
        ratio = run["initial_s"] / run["reference_s"]
        noop_ratio = run["noop_s"] / run["initial_s"]
        figures += [
            Figure(
                f"{label} initial load (ms)",
                round(run["initial_s"] * 1000, 1),
                f"executemany upsert: {run['reference_s'] * 1000:,.1f} ms",
            ),
            Figure(f"{label} initial / upsert", round(ratio, 2), "1.0", "<= 2x", ratio <= 2),
            Figure(
                f"{label} no-op resync (ms)",
                round(run["noop_s"] * 1000, 1),
                f"initial: {run['initial_s'] * 1000:,.1f} ms",
            ),
            Figure(
                f"{label} no-op / initial",
                round(noop_ratio, 3),
                f"rows written: {run['noop_written'] + run['history_rows_added_by_noop']}",
                "<= 0.3x, 0 rows",
                noop_ratio <= 0.3
                and run["noop_written"] == 0
                and run["history_rows_added_by_noop"] == 0,
            ),
        ]
    report("reconcile", figures, {"runs": runs})


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--backend", action="append", choices=["sqlite", "postgresql"], dest="backends"
    )
    args = parser.parse_args()
    asyncio.run(main(args.backends or ["sqlite", "postgresql"]))


if __name__ == "__main__":
    cli()
