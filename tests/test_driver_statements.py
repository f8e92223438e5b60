"""Driver statements against the real databases: they run inside the session's transaction,
fail as SQLAlchemy's errors without their parameters, and PostgreSQL's pooled connections
are pinged after an idle spell, so one the server dropped is replaced before it is used."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlmodel import col

from tests.support.reconcile import mirrored_seats
from tests.support.settings import PG_ADMIN_URL
from worker.models import SeatScope, utcnow
from worker.platform import db as platform_db
from worker.platform.db import (
    DriverStatements,
    driver_statements,
    is_retryable_db_error,
    retry_transaction,
    transaction,
)
from worker.polar.schemas import SeatsList
from worker.simulator.state import SimState
from worker.sync.reconcile import ReconcileResult, reconcile_scope

EMAIL = "private.person@example.com"
# PING_AFTER_IDLE_SECONDS for the test that waits it out.
SHORT_IDLE = 0.05


class AbandonedError(Exception):
    """Raised inside a transaction to end it with a rollback."""


async def add_scope(db: DriverStatements, scope_id: str) -> None:
    m = db.mark
    await db.execute(
        "INSERT INTO seat_scope (kind, scope_id, created_at, consecutive_failures) "
        f"VALUES ({m(1)}, {m(2)}, {m(3)}, 0)",
        ("subscription", scope_id, db.timestamp(utcnow())),
    )


async def stored_scope_ids(sessions: async_sessionmaker[AsyncSession]) -> set[str]:
    """The scope ids committed to seat_scope."""
    async with sessions() as session:
        return set((await session.execute(select(col(SeatScope.scope_id)))).scalars())


# ---------------------------------------------------------------------- both backends


async def test_a_failing_driver_statement_rolls_back_and_hides_its_parameters(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> None:
    async def write_then_fail() -> None:
        async with transaction(sessions) as session:
            db = await driver_statements(session)
            await add_scope(db, "written-first")
            await db.execute(f"INSERT INTO no_such_table (email) VALUES ({db.mark(1)})", [EMAIL])

    with pytest.raises(DBAPIError) as raised:
        await write_then_fail()

    if engine.dialect.name == "sqlite":
        assert isinstance(raised.value, OperationalError)
    assert "no_such_table" in str(raised.value)
    assert EMAIL not in str(raised.value)
    assert not is_retryable_db_error(raised.value)
    assert await stored_scope_ids(sessions) == set()


async def test_the_first_driver_statement_of_a_transaction_hides_its_parameters_too(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async def fail_first() -> None:
        async with transaction(sessions) as session:
            db = await driver_statements(session)
            await db.execute(f"INSERT INTO no_such_table (email) VALUES ({db.mark(1)})", [EMAIL])

    with pytest.raises(DBAPIError) as raised:
        await fail_first()

    assert "no_such_table" in str(raised.value)
    assert EMAIL not in str(raised.value)


async def test_driver_statements_see_what_the_session_wrote_in_its_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with transaction(sessions) as session:
        session.add(SeatScope(kind="subscription", scope_id="flushed", created_at=utcnow()))
        await session.flush()
        db = await driver_statements(session)
        rows = await db.fetch(
            f"SELECT scope_id FROM seat_scope WHERE kind = {db.mark(1)}", ["subscription"]
        )

    assert [tuple(row) for row in rows] == [("flushed",)]


async def test_the_session_sees_what_driver_statements_wrote_in_its_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with transaction(sessions) as session:
        db = await driver_statements(session)
        await add_scope(db, "driven")
        seen = await session.get(SeatScope, ("subscription", "driven"))

    assert seen is not None and seen.consecutive_failures == 0


async def test_driver_writes_are_rolled_back_with_the_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async def write_then_abandon() -> None:
        async with transaction(sessions) as session:
            db = await driver_statements(session)
            await add_scope(db, "first")  # PostgreSQL: through SQLAlchemy's adapter
            await add_scope(db, "second")  # PostgreSQL: straight on asyncpg
            raise AbandonedError

    with pytest.raises(AbandonedError):
        await write_then_abandon()

    assert await stored_scope_ids(sessions) == set()


async def test_driver_writes_are_committed_with_the_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with transaction(sessions) as session:
        db = await driver_statements(session)
        await add_scope(db, "first")
        await add_scope(db, "second")

    assert await stored_scope_ids(sessions) == {"first", "second"}


SCOPE_COLUMNS = ("kind", "scope_id", "created_at", "consecutive_failures")


def scope_rows(db: DriverStatements, *scope_ids: str) -> list[tuple[object, ...]]:
    return [("subscription", s, db.timestamp(utcnow()), 0) for s in scope_ids]


async def test_inserted_rows_are_committed_or_rolled_back_with_the_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # PostgreSQL appends them with COPY inside the transaction (after its first statement).
    async def insert(abandon: bool, *scope_ids: str) -> None:
        async with transaction(sessions) as session:
            db = await driver_statements(session)
            await add_scope(db, f"before-{scope_ids[0]}")
            await db.insert_rows("seat_scope", SCOPE_COLUMNS, scope_rows(db, *scope_ids))
            if abandon:
                raise AbandonedError

    with pytest.raises(AbandonedError):
        await insert(True, "dropped-1", "dropped-2")
    await insert(False, "kept-1", "kept-2")

    assert await stored_scope_ids(sessions) == {"before-kept-1", "kept-1", "kept-2"}


async def test_inserted_rows_that_violate_a_key_fail_without_their_parameters(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # The key itself may be named (PostgreSQL's DETAIL); the other values never are.
    marker = 987_654_321

    async def insert_twice() -> None:
        async with transaction(sessions) as session:
            db = await driver_statements(session)
            await add_scope(db, "taken")
            rows = [(*row[:3], marker) for row in scope_rows(db, "new", "taken")]
            await db.insert_rows("seat_scope", SCOPE_COLUMNS, rows)

    with pytest.raises(DBAPIError) as raised:
        await insert_twice()

    assert "seat_scope" in str(raised.value)
    assert str(marker) not in str(raised.value)
    assert not is_retryable_db_error(raised.value)
    assert await stored_scope_ids(sessions) == set()


# ---------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_sessions(
    engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]
) -> async_sessionmaker[AsyncSession]:
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    return sessions


async def test_autocommit_sessions_commit_each_statement_on_its_own(
    engine: AsyncEngine, pg_sessions: async_sessionmaker[AsyncSession]
) -> None:
    autocommit = platform_db.session_factory(engine, autocommit=True)

    async def write_then_abandon() -> None:
        async with transaction(autocommit) as session:
            db = await driver_statements(session)
            await add_scope(db, "first")
            # Already visible to everyone else: no transaction holds it back.
            assert await stored_scope_ids(pg_sessions) == {"first"}
            await add_scope(db, "second")
            raise AbandonedError

    with pytest.raises(AbandonedError):
        await write_then_abandon()

    assert await stored_scope_ids(pg_sessions) == {"first", "second"}


async def terminate(database_url: str, *pids: int) -> list[int]:
    """Terminate the given backends, or every `seat-sync` backend on the test's database,
    as an administrator would, and wait until they are gone; the pids terminated."""
    database = make_url(database_url).database
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        rows = await admin.fetch(
            # With a timeout, pg_terminate_backend returns once the backend has exited.
            "SELECT pid, pg_terminate_backend(pid, 5000) AS gone FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = 'seat-sync' "
            "AND (cardinality($2::int[]) = 0 OR pid = ANY($2::int[]))",
            database,
            list(pids),
        )
    finally:
        await admin.close()
    assert rows and all(row["gone"] for row in rows)
    return [row["pid"] for row in rows]


async def backend_pid(sessions: async_sessionmaker[AsyncSession]) -> int:
    """The server pid behind the connection a plain transaction gets now."""
    async with transaction(sessions) as session:
        return int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def test_the_first_driver_statement_begins_the_session_transaction(
    pg_sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with transaction(pg_sessions) as session:
        db = await driver_statements(session)
        [(xid, started)] = await db.fetch("SELECT txid_current(), now()")
        [(again, started_again)] = await db.fetch("SELECT txid_current_if_assigned(), now()")
        through_session = (
            await session.execute(text("SELECT txid_current_if_assigned()"))
        ).scalar_one()

    # Outside a transaction each statement would be its own: no xid yet, a later now().
    assert again == xid == through_session
    assert started_again == started


async def test_a_deadlock_between_driver_statements_is_retried(
    pg_sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Errors on asyncpg itself are SQLAlchemy's, so retry_transaction still recognises
    PostgreSQL's deadlock and runs the losing transaction again."""
    async with transaction(pg_sessions) as session:
        db = await driver_statements(session)
        await add_scope(db, "a")
        await add_scope(db, "b")
    locked = {"a": asyncio.Event(), "b": asyncio.Event()}
    attempts: list[str] = []

    def locking(first: str, then: str) -> Callable[[AsyncSession], Awaitable[None]]:
        async def work(session: AsyncSession) -> None:
            attempts.append(first)
            # Through SQLAlchemy: the row locks below then go straight to asyncpg.
            await session.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
            db = await driver_statements(session)
            lock = f"SELECT 1 FROM seat_scope WHERE scope_id = {db.mark(1)} FOR UPDATE"
            await db.fetch(lock, [first])
            locked[first].set()
            await locked[then].wait()  # both hold one row: each now waits for the other's
            await db.fetch(lock, [then])

        return work

    await asyncio.gather(
        retry_transaction(pg_sessions, locking("a", "b"), base_delay=0.01),
        retry_transaction(pg_sessions, locking("b", "a"), base_delay=0.01),
    )

    assert sorted(attempts) in (["a", "a", "b"], ["a", "b", "b"])


async def test_a_connection_killed_while_idle_is_replaced_at_checkout(
    pg_sessions: async_sessionmaker[AsyncSession],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(platform_db, "PING_AFTER_IDLE_SECONDS", SHORT_IDLE)
    killed = await backend_pid(pg_sessions)
    assert await terminate(database_url) == [killed]
    await asyncio.sleep(SHORT_IDLE * 2)  # idle past the window: the next checkout pings

    async with transaction(pg_sessions) as session:
        pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()

    assert pid != killed


async def test_a_connection_killed_within_the_ping_window_fails_its_next_transaction(
    pg_sessions: async_sessionmaker[AsyncSession],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the ping spares an idle connection: unpinged, a dead one fails its first
    statement, as a disconnect (retryable)."""
    monkeypatch.setattr(platform_db, "PING_AFTER_IDLE_SECONDS", 3600.0)
    await backend_pid(pg_sessions)
    await terminate(database_url)

    with pytest.raises(DBAPIError) as raised:
        await backend_pid(pg_sessions)

    assert is_retryable_db_error(raised.value)


async def test_retry_transaction_gets_past_a_connection_killed_within_the_ping_window(
    pg_sessions: async_sessionmaker[AsyncSession],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(platform_db, "PING_AFTER_IDLE_SECONDS", 3600.0)
    killed = await backend_pid(pg_sessions)
    await terminate(database_url)
    attempts = 0

    async def work(session: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        return int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    pid = await retry_transaction(pg_sessions, work, base_delay=0.01)

    assert attempts == 2
    assert pid != killed


async def test_a_connection_that_dies_under_a_driver_statement_is_not_pooled_again(
    pg_sessions: async_sessionmaker[AsyncSession],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(platform_db, "PING_AFTER_IDLE_SECONDS", 3600.0)
    killed: list[int] = []

    async def die_midway() -> None:
        async with transaction(pg_sessions) as session:
            db = await driver_statements(session)
            [(pid,)] = await db.fetch("SELECT pg_backend_pid()")
            killed.extend(await terminate(database_url, pid))
            await db.fetch("SELECT 1")  # straight on asyncpg: the transaction has begun

    with pytest.raises(DBAPIError) as raised:
        await die_midway()
    assert is_retryable_db_error(raised.value)

    # No ping within the window: had the dead connection gone back to the pool, the next
    # transaction would get it and fail.
    assert await backend_pid(pg_sessions) not in killed


def subscription_listing(state: SimState, emails: list[str]) -> tuple[str, SeatsList]:
    subscription_id = str(state.create_subscription(seats=len(emails) + 1)["id"])
    for email in emails:
        state.assign(subscription_id=subscription_id, email=email)
    return subscription_id, SeatsList.model_validate(
        state.list_seats(subscription_id=subscription_id)
    )


async def reconcile_counting(
    sessions: async_sessionmaker[AsyncSession],
    subscription_id: str,
    listing: SeatsList,
    *,
    kill_first_attempt_midway: str | None = None,
) -> tuple[ReconcileResult, int]:
    """Reconcile `listing` through retry_transaction, as a sync job does: (result, attempts).
    With `kill_first_attempt_midway` (the database URL), the first attempt's connection is
    terminated after its transaction has begun, before the reconcile's first statement."""
    fetch_started_at = datetime.now(UTC)
    attempts = 0

    async def work(session: AsyncSession) -> ReconcileResult:
        nonlocal attempts
        attempts += 1
        if kill_first_attempt_midway is not None and attempts == 1:
            db = await driver_statements(session)
            [(pid,)] = await db.fetch("SELECT pg_backend_pid()")
            await terminate(kill_first_attempt_midway, pid)
        return await reconcile_scope(
            session,
            kind="subscription",
            scope_id=subscription_id,
            seats=listing,
            fetch_started_at=fetch_started_at,
            now=datetime.now(UTC),
        )

    result = await retry_transaction(sessions, work, base_delay=0.01)
    return result, attempts


async def mirrored_emails(sessions: async_sessionmaker[AsyncSession]) -> dict[str, str | None]:
    return {
        seat_id: seat.email
        for seat_id, seat in (await mirrored_seats(sessions)).items()
        if seat.gone_at is None
    }


async def test_a_reconcile_whose_connection_was_killed_between_transactions_completes(
    pg_sessions: async_sessionmaker[AsyncSession],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(platform_db, "PING_AFTER_IDLE_SECONDS", 3600.0)  # no ping to save it
    state = SimState(seed=7)
    subscription_id, listing = subscription_listing(state, ["ann@example.com"])
    await reconcile_counting(pg_sessions, subscription_id, listing)
    state.assign(subscription_id=subscription_id, email="bo@example.com")
    grown = SeatsList.model_validate(state.list_seats(subscription_id=subscription_id))
    await terminate(database_url)

    result, attempts = await reconcile_counting(pg_sessions, subscription_id, grown)

    assert attempts == 2
    assert (result.inserted, result.unchanged) == (1, 1)
    assert await mirrored_emails(pg_sessions) == {s.id: s.email for s in grown.seats}


async def test_a_reconcile_whose_connection_dies_mid_transaction_is_retried_whole(
    pg_sessions: async_sessionmaker[AsyncSession], database_url: str
) -> None:
    state = SimState(seed=7)
    subscription_id, listing = subscription_listing(state, ["ann@example.com", "bo@example.com"])

    result, attempts = await reconcile_counting(
        pg_sessions, subscription_id, listing, kill_first_attempt_midway=database_url
    )

    assert attempts == 2
    assert result.inserted == 2
    assert await mirrored_emails(pg_sessions) == {s.id: s.email for s in listing.seats}


# ---------------------------------------------------------------------- SQLite's write lock


@pytest.mark.parametrize("poll", [None, 0.003], ids=["busy-handler", "polled"])
async def test_a_sqlite_writer_waits_for_the_lock_another_process_holds(
    database_url: str, poll: float | None
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's single writer")
    path = platform_db.sqlite_path(database_url)
    assert path is not None
    engine = platform_db.create_engine(database_url, lock_poll_seconds=poll)
    sessions = platform_db.session_factory(engine)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")

        async def write() -> None:
            async with transaction(sessions) as session:
                db = await driver_statements(session)
                await db.execute("UPDATE seat_scope SET consecutive_failures = 0")

        writer = asyncio.create_task(write())
        await asyncio.sleep(0.3)
        assert not writer.done()  # still waiting for the lock
        holder.execute("COMMIT")
        await asyncio.wait_for(writer, timeout=5)
    finally:
        holder.close()
        await engine.dispose()


async def test_a_polled_sqlite_writer_gives_up_with_a_retryable_error(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's single writer")
    path = platform_db.sqlite_path(database_url)
    assert path is not None
    monkeypatch.setattr(platform_db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    engine = platform_db.create_engine(database_url, lock_poll_seconds=0.003)
    sessions = platform_db.session_factory(engine)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError) as raised:
            async with transaction(sessions) as session:
                await session.connection()
        assert "database is locked" in str(raised.value)
        assert is_retryable_db_error(raised.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        await engine.dispose()


async def test_a_sqlite_connection_returned_inside_a_transaction_is_rolled_back(
    database_url: str,
) -> None:
    # A connection must not go back to the pool inside a transaction: it would keep
    # SQLite's write lock, and its next BEGIN would fail.
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's pool reset")
    path = platform_db.sqlite_path(database_url)
    assert path is not None
    engine = platform_db.create_engine(database_url)
    try:
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            await driver.execute_fetchall("BEGIN IMMEDIATE")
            await driver.execute_fetchall(
                "INSERT INTO seat_scope (kind, scope_id, created_at, consecutive_failures) "
                "VALUES ('subscription', 'left-open', '2026-12-01 00:00:00.000000', 0)"
            )
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # "database is locked" if it were still held
            assert other.execute("SELECT count(*) FROM seat_scope").fetchone() == (0,)
            other.execute("ROLLBACK")
        finally:
            other.close()
    finally:
        await engine.dispose()


async def test_transactions_cancelled_at_any_point_leave_the_pool_usable(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # A cancelled task may leave work queued in the driver (SQLite: a BEGIN that aiosqlite's
    # thread runs after the task is gone). Whatever point the cancel hits, the next
    # transaction on the pool must start and commit.
    async def write(scope_id: str) -> None:
        async with transaction(sessions) as session:
            await add_scope(await driver_statements(session), scope_id)

    for n in range(60):
        task = asyncio.create_task(write(f"cancelled-{n}"))
        for _ in range(n % 6):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await write(f"after-{n}")  # fails if the pool gave out a connection mid-transaction
    assert {f"after-{n}" for n in range(60)} <= await stored_scope_ids(sessions)
