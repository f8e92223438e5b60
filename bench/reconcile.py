"""Reconcile: initial load and no-op resync of 1 scope x 1,000 seats and 100 scopes x 100
seats into SQLite and PostgreSQL, beside a plain `executemany` upsert of the same seat rows
through the same driver (aiosqlite / asyncpg), each scope in its own transaction.

Times cover the database work only: the seat lists are parsed from answer bytes
(`SeatsList.from_body`) beforehand, exactly what `sync_scope` hands to `reconcile_scope`
after its fetch. The no-op resync gets a fresh parse of the same answer, as a new fetch of
an unchanged scope would (`seat_scope.list_digest` recognises it); a second no-op gets the
same seats in reversed order (another answer: Polar guarantees no order), which reconcile
compares seat by seat. Both sides open their connection
and prepare their statements before the clock starts (the worker keeps a pool). Per scope,
its initial load, its no-op resync and the reference upsert run back to back, so the three
share the machine's load of the moment; each shape is measured `--repeat` times with fresh
databases, ratios are taken within a repeat, and the table shows their median.

    .venv/bin/python -m bench.reconcile [--backend sqlite --backend postgresql] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosqlite
import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

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
    """Lists as the worker gets them: parsed from Polar's answer (`SeatsList.from_body`)."""
    now = datetime.now(UTC)
    lists = {}
    for _ in range(scopes):
        scope_id = str(uuid.uuid4())
        raw = [seat_dict(scope_id, n, now) for n in range(seats)]
        built = SeatsList.model_validate({"seats": raw, "total_seats": seats, "available_seats": 0})
        lists[scope_id] = SeatsList.from_body(built.model_dump_json().encode())
    return lists


async def reconcile_one(
    sessions: async_sessionmaker[AsyncSession], scope_id: str, seats: SeatsList
) -> tuple[float, int]:
    """Seconds to reconcile one list in its own transaction, and rows written."""
    started = time.perf_counter()
    async with transaction(sessions) as session:
        result = await reconcile_scope(
            session,
            kind="subscription",
            scope_id=scope_id,
            seats=seats,
            fetch_started_at=datetime.now(UTC),
            now=datetime.now(UTC),
        )
    return time.perf_counter() - started, result.written


def reordered(seats: SeatsList) -> SeatsList:
    """The same seats in another order (reversed), parsed from that answer: Polar guarantees
    no order, so an unchanged scope may come back so; reconcile then compares seat by seat."""
    listing = seats.model_dump(mode="json")
    listing["seats"].reverse()
    return SeatsList.from_body(json.dumps(listing).encode())


def reparsed(seats: SeatsList) -> SeatsList:
    """The same list parsed again from the same answer, as the next fetch of an unchanged
    scope gives it."""
    return SeatsList.from_body(seats.model_dump_json().encode())


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


# seat-sync's update trigger on seat (migration 0004). It is no part of a plain upsert, and
# on SQLite its mere presence makes INSERT .. ON CONFLICT DO UPDATE twice as slow even
# when nothing conflicts: the reference table goes without it.
DIGEST_GUARD = "seat_polar_digest_guard"


class PlainUpsert:
    """The reference: one `executemany` INSERT .. ON CONFLICT DO UPDATE per scope, on a
    connection of the driver itself, opened before any timing, into the seat table
    without seat-sync's digest guard trigger."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.sqlite = database_url.startswith("sqlite")
        updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
        marks = ", ".join("?" if self.sqlite else f"${n}" for n in range(1, len(COLUMNS) + 1))
        self.sql = (
            f"INSERT INTO seat ({', '.join(COLUMNS)}) VALUES ({marks}) "  # noqa: S608
            f"ON CONFLICT (id) DO UPDATE SET {updates}"
        )
        self.lite: aiosqlite.Connection | None = None
        self.pg: asyncpg.Connection | None = None

    async def __aenter__(self) -> PlainUpsert:
        if self.sqlite:
            self.lite = await aiosqlite.connect(str(sqlite_path(self.url)), isolation_level=None)
            await self.lite.execute("PRAGMA journal_mode = WAL")
            await self.lite.execute("PRAGMA synchronous = NORMAL")
            await self.lite.execute(f"DROP TRIGGER IF EXISTS {DIGEST_GUARD}")
        else:
            self.pg = await asyncpg.connect(self.url)
            await self.pg.execute(f"DROP TRIGGER IF EXISTS {DIGEST_GUARD} ON seat")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.lite is not None:
            await self.lite.close()
        if self.pg is not None:
            await self.pg.close()

    async def upsert(self, rows: list[dict[str, Any]]) -> float:
        """Seconds to upsert one scope's rows (values converted inside the timing)."""
        started = time.perf_counter()
        if self.lite is not None:
            await self.lite.execute("BEGIN IMMEDIATE")
            await self.lite.executemany(
                self.sql, [[_sqlite_value(r[c]) for c in COLUMNS] for r in rows]
            )
            await self.lite.execute("COMMIT")
        else:
            assert self.pg is not None
            async with self.pg.transaction():
                await self.pg.executemany(
                    self.sql, [[_pg_value(r[c]) for c in COLUMNS] for r in rows]
                )
        return time.perf_counter() - started


async def scope_floor(sessions: async_sessionmaker[AsyncSession], scope_id: str) -> float:
    """Seconds for the least any sync of a scope does: one transaction that writes the
    scope's row (the freshness guard) and nothing else, through the same sessions."""
    started = time.perf_counter()
    async with transaction(sessions) as session:
        conn = await session.connection()
        mark = "?" if conn.dialect.name == "sqlite" else "$1"
        await conn.exec_driver_sql(
            f"UPDATE seat_scope SET consecutive_failures = 0 WHERE scope_id = {mark}",  # noqa: S608
            (scope_id,),
        )
    return time.perf_counter() - started


async def measure_once(backend: str, shape: str) -> dict[str, Any]:
    """Initial loads, each scope followed at once by the reference upsert of its rows into a
    second database (so both share the machine's load of the moment); then, once every
    scope is loaded, the no-op resyncs (a fresh parse of the same lists), each followed by
    the floor transaction of that scope."""
    scopes, seats = SHAPES[shape]
    lists = make_lists(scopes, seats)
    again = {scope_id: reparsed(seat_list) for scope_id, seat_list in lists.items()}
    shuffled = {scope_id: reordered(seat_list) for scope_id, seat_list in lists.items()}
    now = datetime.now(UTC)
    rows = {scope_id: upsert_rows(seat_list, now) for scope_id, seat_list in lists.items()}
    ((warm_id, warm),) = make_lists(1, 50).items()
    # The lists of every phase are built before the clock starts; keep the garbage
    # collector from rescanning them inside whichever timing happens to trigger it.
    gc.collect()
    gc.freeze()
    initial = noop = compared = reference = floor = 0.0
    written = noop_written = 0
    async with (
        database(backend, "reconcile") as url,
        database(backend, "reference") as reference_url,
        PlainUpsert(reference_url) as plain,
    ):
        engine = create_engine(url)
        try:
            sessions = session_factory(engine)
            # Connect, compile and prepare statements: not timed.
            await reconcile_one(sessions, warm_id, warm)
            await reconcile_one(sessions, warm_id, reparsed(warm))
            await scope_floor(sessions, warm_id)
            await plain.upsert(upsert_rows(warm, now))
            for scope_id, seat_list in lists.items():
                seconds, count = await reconcile_one(sessions, scope_id, seat_list)
                initial, written = initial + seconds, written + count
                reference += await plain.upsert(rows[scope_id])
            for scope_id, seat_list in again.items():
                seconds, count = await reconcile_one(sessions, scope_id, seat_list)
                noop, noop_written = noop + seconds, noop_written + count
                floor += await scope_floor(sessions, scope_id)
            for scope_id, seat_list in shuffled.items():
                seconds, count = await reconcile_one(sessions, scope_id, seat_list)
                compared, noop_written = compared + seconds, noop_written + count
        finally:
            await engine.dispose()
            gc.unfreeze()
        reference_rows = await scalar(reference_url, "SELECT count(*) FROM seat")
        # Every initial load writes one `created` row per seat; anything more came from a no-op.
        history = await scalar(url, "SELECT count(*) FROM seat_change") - 50 - written
    return {
        "initial_s": initial,
        "written": written,
        "reference_s": reference,
        "reference_rows": reference_rows - 50,
        "noop_s": noop,
        "noop_written": noop_written,
        "history_rows_added_by_noop": history,
        "floor_s": floor,
        "initial_over_reference": initial / reference,
        "noop_over_initial": noop / initial,
        "compared_s": compared,
        "compared_over_initial": compared / initial,
        "floor_over_initial": floor / initial,
    }


async def measure(backend: str, shape: str, repeat: int) -> dict[str, Any]:
    """`repeat` independent measurements (fresh databases and lists), ratios per repeat."""
    scopes, seats = SHAPES[shape]
    repeats = [await measure_once(backend, shape) for _ in range(repeat)]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in repeats)

    return {
        "backend": backend,
        "shape": shape,
        "seats": scopes * seats,
        "repeats": repeats,
        **{
            key: median(key)
            for key in (
                "initial_s",
                "reference_s",
                "noop_s",
                "initial_over_reference",
                "noop_over_initial",
                "compared_s",
                "compared_over_initial",
                "floor_s",
                "floor_over_initial",
            )
        },
        "rows_written_by_noop": max(
            r["noop_written"] + r["history_rows_added_by_noop"] for r in repeats
        ),
        "initial_wrote_every_seat": all(r["written"] == scopes * seats for r in repeats),
    }


def _spread(run: dict[str, Any], key: str) -> str:
    values = sorted(r[key] for r in run["repeats"])
    return ", ".join(f"{v:.2f}" for v in values)


async def main(backends: Sequence[str], repeat: int) -> None:
    runs = [await measure(b, shape, repeat) for b in backends for shape in SHAPES]
    figures: list[Figure] = []
    for run in runs:
        label = f"{run['backend']} {run['shape']}"
        ratio = run["initial_over_reference"]
        noop_ratio = run["noop_over_initial"]
        figures += [
            Figure(
                f"{label} initial load (ms)",
                round(run["initial_s"] * 1000, 1),
                f"executemany upsert: {run['reference_s'] * 1000:,.1f} ms",
            ),
            Figure(
                f"{label} initial / upsert",
                round(ratio, 2),
                f"each repeat: {_spread(run, 'initial_over_reference')}",
                "<= 2x",
                ratio <= 2 and run["initial_wrote_every_seat"],
            ),
            Figure(
                f"{label} no-op resync (ms)",
                round(run["noop_s"] * 1000, 1),
                f"initial: {run['initial_s'] * 1000:,.1f} ms",
            ),
            Figure(
                f"{label} no-op / initial",
                round(noop_ratio, 3),
                f"each repeat: {_spread(run, 'noop_over_initial')}; "
                f"rows written: {run['rows_written_by_noop']}",
                "<= 0.3x, 0 rows",
                noop_ratio <= 0.3 and run["rows_written_by_noop"] == 0,
            ),
            Figure(
                f"{label} no-op, reordered / initial",
                round(run["compared_over_initial"], 3),
                f"each repeat: {_spread(run, 'compared_over_initial')}; the same seats in "
                f"another order: compared seat by seat ({run['compared_s'] * 1000:,.1f} ms)",
                "<= 0.3x, 0 rows",
                run["compared_over_initial"] <= 0.3 and run["rows_written_by_noop"] == 0,
            ),
            Figure(
                f"{label} floor / initial",
                round(run["floor_over_initial"], 3),
                f"floor: {run['floor_s'] * 1000:,.1f} ms (a transaction writing only the "
                "scope row, per scope)",
            ),
        ]
    report("reconcile", figures, {"repeat": repeat, "runs": runs})


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--backend", action="append", choices=["sqlite", "postgresql"], dest="backends"
    )
    parser.add_argument("--repeat", type=int, default=3, help="measurements per shape")
    args = parser.parse_args()
    asyncio.run(main(args.backends or ["sqlite", "postgresql"], args.repeat))


if __name__ == "__main__":
    cli()
