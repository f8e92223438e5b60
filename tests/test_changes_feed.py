"""`seat-sync changes`: the seat_change feed for provisioning scripts. A consumer that keeps
the last id and asks `--after` it sees every row once, in id order, even while several
writers commit concurrently and out of id order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.support.commands import SEAT_SYNC, env_for, environment, seat_sync
from worker.simulator.server import SimulatedPolar

FEED_KEYS = {
    "id",
    "observed_at",
    "seat_id",
    "scope_kind",
    "scope_id",
    "change",
    "old_status",
    "new_status",
    "old_email",
    "new_email",
    "old_member_id",
    "new_member_id",
    "old_customer_id",
    "new_customer_id",
}


async def feed(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    ran = await seat_sync("changes", *args, "--format", "ndjson", env=env)
    assert ran.code == 0, ran.err
    return [json.loads(line) for line in ran.out.splitlines()]


async def test_rows_come_in_id_order_and_after_skips_what_was_seen(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=3)
    ann = state.assign(subscription_id=sub["id"], email="ann@example.com")
    state.assign(subscription_id=sub["id"], email="bo@example.com")
    env = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0

    first = await feed(env)
    assert [r["change"] for r in first] == ["created", "created"]
    assert set(first[0]) == FEED_KEYS
    assert [r["id"] for r in first] == sorted(r["id"] for r in first)
    cursor = first[-1]["id"]
    assert await feed(env, "--after", str(cursor)) == []

    state.claim(ann["id"])
    state.revoke(ann["id"])
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0

    [revoked] = await feed(env, "--after", str(cursor))
    assert revoked["id"] > cursor
    assert (revoked["seat_id"], revoked["old_status"], revoked["new_status"]) == (
        ann["id"],
        "pending",
        "revoked",
    )
    assert (revoked["old_email"], revoked["new_email"]) == ("ann@example.com", None)


async def test_every_format_carries_the_cursor(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=1)
    sim.state.assign(subscription_id=sub["id"], email="cy@example.com")
    env = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0

    as_json = await seat_sync("changes", "--format", "json", env=env)
    as_csv = await seat_sync("changes", "--format", "csv", env=env)
    as_table = await seat_sync("changes", env=env)

    [row] = json.loads(as_json.out)
    header, line = as_csv.out.strip().splitlines()
    assert set(header.split(",")) == FEED_KEYS and line.startswith(f"{row['id']},")
    assert as_table.out.splitlines()[1].split()[:2] == ["id", "observed_at"]
    assert str(row["id"]) in as_table.out and "cy@example.com" in as_table.out


async def follow(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        SEAT_SYNC,
        "changes",
        "--follow",
        "--interval",
        "0.05",
        *args,
        env=environment(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_rows(
    proc: asyncio.subprocess.Process, count: int, *, within: float = 30.0
) -> list[dict[str, Any]]:
    """The next `count` rows `--follow` prints, or those printed within `within` seconds."""
    assert proc.stdout is not None
    rows: list[dict[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while len(rows) < count:
                rows.append(json.loads(await proc.stdout.readline()))
    return rows


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
async def test_follow_prints_new_rows_until_interrupted(
    sim: SimulatedPolar, database_url: str, redis_url: str, stop: signal.Signals
) -> None:
    sub = sim.state.create_subscription(seats=2)
    env = env_for(database_url, sim, redis_url)
    proc = await follow(env, "--format", "ndjson")
    try:
        sim.state.assign(subscription_id=sub["id"], email="di@example.com")
        assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0
        [created] = await read_rows(proc, 1)
        sim.state.assign(subscription_id=sub["id"], email="ed@example.com")
        assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0
        [second] = await read_rows(proc, 1)
    finally:
        proc.send_signal(stop)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)

    assert (created["new_email"], second["new_email"]) == ("di@example.com", "ed@example.com")
    assert second["id"] > created["id"]
    assert proc.returncode == 0, err
    assert out == b"" and b"Traceback" not in err


async def test_follow_as_json_closes_the_list_when_interrupted(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=1)
    sim.state.assign(subscription_id=sub["id"], email="fi@example.com")
    env = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0
    proc = await follow(env, "--format", "json")
    assert proc.stdout is not None
    printed = b""
    async with asyncio.timeout(20):
        while b"fi@example.com" not in printed:
            printed += await proc.stdout.read(1024)
    proc.send_signal(signal.SIGINT)
    rest, _ = await asyncio.wait_for(proc.communicate(), timeout=20)

    assert proc.returncode == 0
    assert [r["new_email"] for r in json.loads(printed + rest)] == ["fi@example.com"]


# ---------------------------------------------------------------------- concurrent writers

INSERT = text(
    "INSERT INTO seat_change (seat_id, scope_kind, scope_id, observed_at, change) "
    "VALUES (:seat, 'subscription', 'sub_feed', :at, 'status') RETURNING id"
)


async def insert_change(conn: AsyncConnection, seat: str) -> int:
    at: Any = datetime.now(UTC)
    if conn.dialect.name == "sqlite":
        at = at.replace(tzinfo=None).isoformat(" ", "microseconds")
    return int((await conn.execute(INSERT, {"seat": seat, "at": at})).scalar_one())


@contextlib.asynccontextmanager
async def open_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        await conn.begin()
        yield conn


async def test_a_lower_id_is_never_stepped_over(
    engine: AsyncEngine, database_url: str, tmp_path: Any
) -> None:
    """Writer A draws a lower id and holds its transaction open; writer B, started later,
    cannot draw a higher id and commit before A ends: a consumer polling in between never
    moves its cursor past A's row."""
    env = {"DATABASE_URL": database_url, "DATA_DIR": str(tmp_path)}
    async with open_transaction(engine) as a:
        a_id = await insert_change(a, "seat_a")

        async def writer_b() -> int:
            async with open_transaction(engine) as b:
                b_id = await insert_change(b, "seat_b")
                await b.commit()
                return b_id

        b_task = asyncio.create_task(writer_b())
        await asyncio.sleep(0.5)
        assert not b_task.done()  # B waits for A: no higher id is drawn before A ends
        assert await feed(env) == []  # nothing committed yet: the cursor stays at 0
        await a.commit()
    b_id = await asyncio.wait_for(b_task, timeout=20)

    rows = await feed(env)
    assert [r["id"] for r in rows] == [a_id, b_id]
    assert a_id < b_id


async def test_without_the_lock_a_consumer_would_miss_a_row(
    engine: AsyncEngine, database_url: str, tmp_path: Any
) -> None:
    """Why migration 0003 adds the lock: without it, PostgreSQL draws ids before commit, so
    a higher id can commit first, and a consumer moving its cursor past it misses the lower
    one for ever. (SQLite has one writer at a time: nothing to show there.)"""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    async with engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER seat_change_feed_order ON seat_change"))
    env = {"DATABASE_URL": database_url, "DATA_DIR": str(tmp_path)}
    async with open_transaction(engine) as a:
        a_id = await insert_change(a, "seat_a")
        async with open_transaction(engine) as b:
            b_id = await insert_change(b, "seat_b")
            await b.commit()
        [seen] = await feed(env)
        await a.commit()

    assert (seen["id"], a_id < b_id) == (b_id, True)
    assert await feed(env, "--after", str(seen["id"])) == []  # a_id is lost to this consumer


async def test_a_following_consumer_sees_each_row_once_under_concurrent_writers(
    engine: AsyncEngine, database_url: str, tmp_path: Any
) -> None:
    """Four writers commit 160 transactions concurrently, each holding its transaction open
    for a random while after drawing its ids, some rolling back; `changes --follow` prints
    exactly the committed rows, each once, in increasing id order."""
    rng = random.Random(7)
    committed: list[int] = []

    async def writer(number: int) -> None:
        for k in range(40):
            async with open_transaction(engine) as conn:
                ids = [await insert_change(conn, f"w{number}-{k}-{n}") for n in range(2)]
                await asyncio.sleep(rng.uniform(0, 0.02))
                if rng.random() < 0.1:
                    await conn.rollback()
                    continue
                await conn.commit()
                committed.extend(ids)
            await asyncio.sleep(rng.uniform(0, 0.01))

    env = {"DATABASE_URL": database_url, "DATA_DIR": str(tmp_path)}
    proc = await follow(env, "--format", "ndjson")
    try:
        await asyncio.gather(*(writer(n) for n in range(4)))
        rows = await read_rows(proc, len(committed))
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), timeout=20)

    ids = [r["id"] for r in rows]
    assert ids == sorted(set(ids))
    assert sorted(ids) == sorted(committed)
