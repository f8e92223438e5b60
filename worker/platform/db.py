"""Database engine and sessions from DATABASE_URL (SQLite: WAL, busy timeout, locking begin)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, StatementError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import await_only

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
# The busy timeout of an engine that polls for the write lock itself (`lock_poll_seconds`):
# SQLite's own handler then retries once, after 1 ms.
SQLITE_POLLED_BUSY_TIMEOUT_MS = 2

# SQLite has one writer per database file. A read-write SQLite engine lets one transaction()
# of this process hold it at a time: the others queue here, in order, instead of polling
# SQLite's busy handler, so a write transaction of another process (the webhook receiver)
# competes with one writer of this process rather than with several. Keyed by engine, then
# by event loop (tests run several loops over a process's lifetime).
_WRITE_LOCKS: weakref.WeakKeyDictionary[
    Engine, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]
] = weakref.WeakKeyDictionary()


def async_url(url: str) -> str:
    """Turn any accepted DATABASE_URL spelling into the async driver SQLAlchemy needs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("DATABASE_URL has no scheme")
    scheme = scheme.lower()
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return f"postgresql+asyncpg://{rest}"
    raise ValueError(f"unsupported DATABASE_URL scheme {scheme!r}")


def is_sqlite(url: str) -> bool:
    return url.lower().startswith("sqlite")


def redacted(url: str) -> str:
    """The URL with any password masked, for logs and messages."""
    try:
        return make_url(async_url(url)).render_as_string(hide_password=True)
    except Exception:  # only used for display
        return "<unparseable DATABASE_URL>"


def sqlite_path(url: str) -> Path | None:
    database = make_url(async_url(url)).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def create_engine(
    url: str,
    *,
    read_only: bool = False,
    pool_size: int = 5,
    max_overflow: int | None = None,
    lock_poll_seconds: float | None = None,
) -> AsyncEngine:
    """An engine for DATABASE_URL. Created at startup, disposed at shutdown (no I/O at import).

    `lock_poll_seconds` (SQLite read-write only): wait for the write lock by retrying every
    that many seconds, up to the busy timeout, instead of with SQLite's busy handler. That
    one sleeps longer the longer it has waited (25, 50, then 100 ms steps), so a writer that
    has waited a while loses the lock to every newcomer, which polls at 1 ms; the webhook
    receiver, whose writes are short, polls in short fixed steps instead.

    PostgreSQL keeps `pool_size` connections and opens up to `max_overflow` (default: as
    many) more under load, each closed again when it is returned.
    """
    full = async_url(url)
    if is_sqlite(full):
        connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        path = sqlite_path(full)
        if read_only and path is not None:
            connect_args["uri"] = True
            full = f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"
        elif path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # The pool's default reset stays: it rolls back every returned connection, queued
        # behind whatever a cancelled task left in aiosqlite's thread (a BEGIN that runs
        # after the task is gone). Checking `in_transaction` first and skipping the hop was
        # tried: such a connection went back to the pool inside a transaction.
        engine = create_async_engine(full, connect_args=connect_args, hide_parameters=True)
        _configure_sqlite(engine, read_only=read_only, lock_poll_seconds=lock_poll_seconds)
        if not read_only:
            _WRITE_LOCKS[engine.sync_engine] = weakref.WeakKeyDictionary()
        return engine
    engine = create_async_engine(
        full,
        hide_parameters=True,  # errors and logs never carry seat data or e-mails
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        connect_args={
            "server_settings": {
                "application_name": "seat-sync",
                # asyncpg prepares every statement; a generic plan cached while the mirror
                # was nearly empty scans the whole seat table on every id lookup later
                # (bench/reconcile: 14.8 ms vs 1.0 ms per lookup at 10k seats).
                "plan_cache_mode": "force_custom_plan",
                **({"default_transaction_read_only": "on"} if read_only else {}),
            }
        },
    )
    event.listen(engine.sync_engine, "checkout", _ping_on_checkout)
    event.listen(engine.sync_engine, "checkin", _note_checkin)
    return engine


# A pooled connection returned less than this long ago is not pinged again (HikariCP's
# "alive bypass window"): a busy worker runs hundreds of transactions a second, and a ping
# costs a round trip each. One that died within the window fails its first statement as
# a disconnect; SQLAlchemy then invalidates the pool and the transaction is retried.
PING_AFTER_IDLE_SECONDS = 1.0


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        record.info["checked_in_at"] = time.monotonic()


def _ping_on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """`pool_pre_ping` in one round trip instead of three (its asyncpg ping wraps `;` in
    BEGIN/ROLLBACK for pgbouncer), skipped for a connection used within the last
    PING_AFTER_IDLE_SECONDS. A connection that fails it is replaced before anyone uses it
    (PostgreSQL restarted, connection cut): SQLAlchemy's documented meaning of a
    DisconnectionError raised at checkout."""
    checked_in_at = record.info.get("checked_in_at")
    if checked_in_at is None or time.monotonic() - checked_in_at < PING_AFTER_IDLE_SECONDS:
        return  # just connected, or used a moment ago
    try:
        await_only(dbapi_connection.driver_connection.fetchval("SELECT 1"))
    except Exception as exc:
        raise DisconnectionError(f"pooled connection failed its ping: {exc}") from exc


def _configure_sqlite(
    engine: AsyncEngine, *, read_only: bool, lock_poll_seconds: float | None
) -> None:
    sync_engine = engine.sync_engine
    polled = lock_poll_seconds is not None and not read_only

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transactions into our own hands so that writers can BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if not read_only:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        if polled:
            # Only BEGIN IMMEDIATE waits for a lock in WAL mode; it polls on its own (below).
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_POLLED_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that later writes can fail with "database is locked"
        # without waiting; taking the write lock up front makes writers queue instead.
        if not polled:
            _sqlite_begin(conn, "BEGIN" if read_only else "BEGIN IMMEDIATE")
            return
        assert lock_poll_seconds is not None
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                _sqlite_begin(conn, "BEGIN IMMEDIATE")
                return
            except OperationalError as exc:
                if "database is locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            # The begin event runs in SQLAlchemy's greenlet on the event loop: sleep there.
            await_only(asyncio.sleep(lock_poll_seconds))


def _sqlite_begin(conn: Any, sql: str) -> None:
    """BEGIN straight on the aiosqlite connection: one hop to its thread, not four (every
    SQLite transaction starts here, the receiver's included)."""
    try:
        await_only(conn.connection.driver_connection.execute_fetchall(sql))
    except sqlite3.Error as exc:
        raise _translated(sql, exc) from exc


def insert_ignoring_conflict(session: AsyncSession, table: Any) -> Any:
    """INSERT .. ON CONFLICT DO NOTHING for the session's backend (both speak it)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


def session_factory(
    engine: AsyncEngine, *, autocommit: bool = False
) -> async_sessionmaker[AsyncSession]:
    """Sessions of `engine`. `autocommit` (PostgreSQL; ignored on SQLite): no BEGIN and no
    COMMIT, every statement commits on its own: for a unit of work that is one write
    statement (the receiver's), two round trips fewer."""
    if autocommit and engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on error. Only boundaries call this."""
    lock = _write_lock(sessions)
    if lock is None:
        async with sessions() as session, session.begin():
            yield session
        return
    try:
        async with asyncio.timeout(SQLITE_BUSY_TIMEOUT_MS / 1000):
            await lock.acquire()
    except TimeoutError:
        # What SQLite itself says once its busy timeout has passed: retryable, like it.
        raise OperationalError(
            "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
        ) from None
    try:
        async with sessions() as session, session.begin():
            yield session
    finally:
        lock.release()


def _write_lock(sessions: async_sessionmaker[AsyncSession]) -> asyncio.Lock | None:
    """This process's write lock for the sessions' engine: SQLite read-write engines only."""
    bind = sessions.kw.get("bind")
    if not isinstance(bind, AsyncEngine):
        return None
    locks = _WRITE_LOCKS.get(bind.sync_engine)
    if locks is None:
        return None
    loop = asyncio.get_running_loop()
    lock = locks.get(loop)
    if lock is None:
        lock = locks[loop] = asyncio.Lock()
    return lock


def is_retryable_db_error(exc: BaseException) -> bool:
    """Lock timeouts, deadlocks, serialization failures and dropped connections."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    text = str(exc).lower()
    markers = (
        "database is locked",
        "deadlock detected",
        "could not serialize",
        "connection was closed",
        "connection refused",
        "connection is closed",
        "terminating connection",
        "cannot connect",
    )
    return isinstance(exc, OperationalError | DBAPIError | OSError) and any(
        m in text for m in markers
    )


async def retry_transaction(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = 5,
    base_delay: float = 0.05,
) -> T:
    """Run `work` in a transaction, retrying it whole on lock or deadlock errors."""
    for attempt in range(1, attempts + 1):
        try:
            async with transaction(sessions) as session:
                return await work(session)
        except (OperationalError, DBAPIError) as exc:
            if attempt == attempts or not is_retryable_db_error(exc):
                raise
            await asyncio.sleep(base_delay * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------- driver statements


class DriverStatements:
    """Plain SQL on the connection of a session's transaction, for the few hot paths that
    must run at the speed of the driver (reconcile, answering the inbox): no compilation,
    no bind or result processing, rows as the driver returns them.

    SQL is written in the backend's own parameter style (`mark(n)`), values already in the
    form the database stores. Errors are SQLAlchemy's, as from any other statement.
    """

    dialect: str

    @staticmethod
    def mark(position: int) -> str:
        """The placeholder of the `position`-th parameter (1-based)."""
        raise NotImplementedError

    @staticmethod
    def timestamp(value: datetime) -> Any:
        """An aware datetime in the form a UTCDateTime column stores it."""
        raise NotImplementedError

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        raise NotImplementedError

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self.fetch(sql, params)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Append `rows` to `table` (no conflict handling: a violation fails the statement)."""
        marks = ", ".join(self.mark(n) for n in range(1, len(columns) + 1))
        await self.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608
            rows,
        )


class _SQLiteStatements(DriverStatements):
    """Straight on the aiosqlite connection: one hop to its thread per statement, where
    SQLAlchemy's adapter takes four (cursor, execute, fetch, close): 75 vs 350 µs each."""

    dialect = "sqlite"

    def __init__(self, driver: Any) -> None:
        self._driver = driver

    @staticmethod
    def mark(position: int) -> str:
        return f"?{position}"  # numbered: the same SQL shape as PostgreSQL's $n

    @staticmethod
    def timestamp(value: datetime) -> Any:
        # What UTCDateTime and SQLAlchemy's SQLite DATETIME store: naive UTC text with
        # microseconds, which sorts and compares as the instants do.
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        try:
            return list(await self._driver.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise _translated(sql, exc) from exc

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            async with self._driver.executemany(sql, rows):
                pass
        except sqlite3.Error as exc:
            raise _translated(sql, exc) from exc


def _translated(sql: str, exc: Exception) -> StatementError:
    # What SQLAlchemy would raise (sqlite3: OperationalError for "database is locked";
    # asyncpg: DBAPIError naming the driver's error, "deadlock detected", "connection was
    # closed"...), so `is_retryable_db_error` and retries see what they always saw.
    # Parameters hidden: they are seat data, not for logs.
    return DBAPIError.instance(sql, None, exc, Exception, hide_parameters=True)


class _AsyncpgStatements(DriverStatements):
    """Straight on the asyncpg connection once SQLAlchemy's adapter has begun the
    transaction (it begins it lazily, with its first statement: that one goes through
    it). Loading 100 seat rows: 0.65 ms here, 1.0 ms through `exec_driver_sql`."""

    dialect = "postgresql"

    def __init__(self, conn: AsyncConnection, driver: Any) -> None:
        self._conn = conn
        self._driver = driver

    @staticmethod
    def mark(position: int) -> str:
        return f"${position}"

    @staticmethod
    def timestamp(value: datetime) -> Any:
        return value.astimezone(UTC)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        if not self._driver.is_in_transaction():
            result = await self._conn.exec_driver_sql(sql, tuple(params))
            return list(result.all()) if result.returns_rows else []
        try:
            return list(await self._driver.fetch(sql, *params))
        except Exception as exc:
            raise _translated(sql, exc) from exc

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not self._driver.is_in_transaction():
            await self._conn.exec_driver_sql(sql, [tuple(row) for row in rows])
            return
        try:
            await self._driver.executemany(sql, rows)
        except Exception as exc:
            raise _translated(sql, exc) from exc

    async def insert_rows(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        # COPY (binary): a third faster than INSERT .. SELECT FROM unnest for 1,000 history
        # rows (12 vs 19 ms); it fires the table's INSERT triggers, statement ones included.
        if not self._driver.is_in_transaction():
            await super().insert_rows(table, columns, rows)
            return
        try:
            await self._driver.copy_records_to_table(table, records=rows, columns=columns)
        except Exception as exc:
            raise _translated(f"COPY {table}", exc) from exc


async def driver_statements(session: AsyncSession) -> DriverStatements:
    """Driver statements inside `session`'s transaction (begun here if it was not)."""
    conn = await session.connection()
    if conn.dialect.name == "sqlite":
        return _SQLiteStatements((await conn.get_raw_connection()).driver_connection)
    raw = await conn.get_raw_connection()
    return _AsyncpgStatements(conn, raw.driver_connection)
