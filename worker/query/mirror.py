"""Opening the mirror for a read: the checks a read needs first (the SQLite file exists, the
schema is current), then a read-only connection; and what a database failure says.

A read never creates, migrates or writes anything. The queries are plain SQL with named
`:params`, run as they are by both drivers: on SQLite by the standard library's `sqlite3`
(a read command then loads no ORM, no async runtime, no pydantic: it answers a cold
process in tens of milliseconds), on PostgreSQL by SQLAlchemy's `text()` over asyncpg.
Values come back as each driver gives them (SQLite: timestamps as naive UTC text); the
helpers below turn them into what the commands print.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from worker.query.environment import MirrorConfig

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.ext.asyncio import AsyncEngine

    from worker.config import Settings
    from worker.resources import Resources

# The schema revisions this code knows, read from the migration scripts themselves.
MIGRATIONS = Path(__file__).resolve().parents[1] / "platform" / "migrations" / "versions"
SQLITE_BUSY_TIMEOUT_S = 30.0


class NoDatabaseError(Exception):
    """The SQLite file a read would open does not exist (a read never creates it)."""


class Mirror(Protocol):
    """A read-only connection to the mirror."""

    dialect: str
    """`sqlite` or `postgresql`."""

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run one SELECT with named `:params`; each row as a dict of column -> value."""
        ...

    def stamp(self, moment: datetime) -> Any:
        """A UTC moment as a parameter this backend compares with stored timestamps."""
        ...


def sqlite_stamp(moment: datetime) -> str:
    """How SQLite stores a timestamp (naive UTC text with microseconds): text comparisons
    with stored values are then comparisons of instants."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def as_datetime(value: Any) -> datetime | None:
    """A stored timestamp (SQLite text, or PostgreSQL's aware datetime) as aware UTC."""
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(value: Any) -> str | None:
    """A stored timestamp as ISO 8601 with +00:00 (history, scopes, status)."""
    moment = as_datetime(value)
    return None if moment is None else moment.isoformat()


def iso_z(value: Any) -> str | None:
    """A stored timestamp as Polar writes it, ending in Z (the CustomerSeat keys)."""
    moment = as_datetime(value)
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def json_value(value: Any) -> Any:
    """A JSON column as the object it holds (SQLite and asyncpg both return the text)."""
    return json.loads(value) if isinstance(value, str) else value


def like_escaped(text: str) -> str:
    """`text` for a LIKE pattern with ESCAPE '\\': its own % and _ match only themselves."""
    return re.sub(r"([\\%_])", r"\\\1", text)


# ---------------------------------------------------------------------- SQLite


def sqlite_file(database_url: str) -> Path | None:
    """The file a sqlite:// DATABASE_URL names (None: in memory), as SQLAlchemy reads it."""
    rest = database_url.split("://", 1)[1].split("?", 1)[0]
    if not rest.startswith("/"):
        return None
    name = rest[1:]
    return None if not name or name == ":memory:" else Path(name)


class SqliteMirror:
    """The mirror's SQLite file through the standard library, opened read-only."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        import sqlite3

        self._conn = sqlite3.connect(
            f"file:{quote(str(path.resolve()))}?mode=ro",
            uri=True,
            timeout=SQLITE_BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        cursor = self._conn.execute(sql, dict(params or {}))
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def stamp(self, moment: datetime) -> str:
        return sqlite_stamp(moment)

    def close(self) -> None:
        self._conn.close()


# ---------------------------------------------------------------------- PostgreSQL


class PostgresMirror:
    """The mirror on PostgreSQL through SQLAlchemy and asyncpg, in read-only transactions.
    Calls are blocking: the commands are short scripts, so one private event loop runs them."""

    dialect = "postgresql"

    def __init__(self, database_url: str) -> None:
        import asyncio

        from worker.platform.db import create_engine

        self._loop = asyncio.new_event_loop()
        self._engine: AsyncEngine = create_engine(database_url, read_only=True, pool_size=1)

    async def _rows(self, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        from sqlalchemy import text

        async with self._engine.connect() as conn:
            result = await conn.execute(text(sql), dict(params))
            return [dict(row) for row in result.mappings()]

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._loop.run_until_complete(self._rows(sql, params or {}))

    def stamp(self, moment: datetime) -> datetime:
        return moment.astimezone(UTC)

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self._engine.dispose())
        finally:
            self._loop.close()


# ---------------------------------------------------------------------- the schema check


def _migration_revisions() -> tuple[str, set[str]] | None:
    """(head, every revision) from the migration scripts, or None when they are not the
    plain linear chain this reads (alembic then decides)."""
    revisions: dict[str, str | None] = {}
    for script in MIGRATIONS.glob("*.py"):
        text = script.read_text(encoding="utf-8")
        rev = re.search(r"^revision(?:\s*:[^=\n]*)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        down = re.search(
            r"^down_revision(?:\s*:[^=\n]*)?\s*=\s*(?:None|['\"]([^'\"]+)['\"])\s*$", text, re.M
        )
        if rev is None and down is None:
            continue  # __init__.py
        if rev is None or down is None:
            return None
        revisions[rev.group(1)] = down.group(1)
    heads = set(revisions) - {d for d in revisions.values() if d is not None}
    if len(heads) != 1:
        return None
    return heads.pop(), set(revisions)


def current_revision(mirror: Mirror) -> str | None:
    try:
        found = mirror.rows("SELECT version_num FROM alembic_version")
    except Exception as exc:
        if "alembic_version" in str(exc):  # an empty database: no such table
            return None
        raise
    return str(found[0]["version_num"]) if found else None


def check_schema(mirror: Mirror) -> None:
    """Refuse a schema behind this code (SchemaBehindError, as `db upgrade` and the worker
    say it). A schema ahead of it is accepted: migrations only add."""
    current = current_revision(mirror)
    known = _migration_revisions()
    if known is not None and current == known[0]:
        return
    from worker.platform.migrate import SchemaBehindError, head_revision, known_revisions

    head = head_revision()
    if current == head:
        return
    if current is None or current in known_revisions():
        raise SchemaBehindError(
            f"database schema is at {current or 'nothing (empty database)'}, this code needs "
            f"{head}: run `seat-sync db upgrade`"
        )


# ---------------------------------------------------------------------- opening


def is_sqlite_url(database_url: str) -> bool:
    return database_url.lower().startswith("sqlite")


def require_database_file(database_url: str) -> Path:
    """The SQLite file, which must exist: NoDatabaseError says how to create it."""
    path = sqlite_file(database_url)
    if path is None:
        raise NoDatabaseError("DATABASE_URL names an in-memory SQLite database: nothing to read")
    if not path.exists():
        raise NoDatabaseError(
            f"no database at {path}: run `seat-sync db upgrade` (or `seat-sync run`) to "
            "create it, or set DATABASE_URL"
        )
    return path


@contextlib.contextmanager
def open_mirror(config: MirrorConfig) -> Iterator[Mirror]:
    """A read-only connection to the mirror at DATABASE_URL, after the checks above."""
    mirror: SqliteMirror | PostgresMirror
    if is_sqlite_url(config.database_url):
        mirror = SqliteMirror(require_database_file(config.database_url))
    else:
        mirror = PostgresMirror(config.database_url)
    try:
        check_schema(mirror)
        yield mirror
    finally:
        mirror.close()


def socket_path(data_dir: Path) -> Path:
    """Where the private Redis of `seat-sync run` listens (as `worker.platform.redis`)."""
    return data_dir.resolve() / "redis.sock"


async def running_redis_url(settings: MirrorConfig) -> str | None:
    """REDIS_URL when set; else the private Redis's socket when one is serving there. A read
    never starts a Redis: without one, what only Redis knows is reported as unknown."""
    if settings.redis_url is not None:
        return settings.redis_url
    if not socket_path(settings.data_dir).exists():
        return None
    from worker.platform.redis import ping, socket_url

    url = socket_url(settings.data_dir)
    return url if await ping(url) else None


@contextlib.asynccontextmanager
async def reading(settings: Settings) -> AsyncIterator[Resources]:
    """Read-only resources on the ORM (the demo's view of its mirror): the database, opened
    read-only after the checks above."""
    from worker.platform.migrate import check_schema as check_orm_schema
    from worker.resources import Resources

    if is_sqlite_url(settings.database_url):
        require_database_file(settings.database_url)
    mirror = await Resources.create(settings, read_only=True)
    try:
        await check_orm_schema(mirror.engine)
        yield mirror
    finally:
        await mirror.aclose()


def database_failure(exc: BaseException) -> str | None:
    """One line for a database failure (refused connection, bad credentials, locked file):
    the first line of the driver's own message, without the statement and parameters
    SQLAlchemy appends. None when `exc` is not a database failure."""
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and isinstance(exc, sqlite3.Error):
        return f"database error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.exc import DBAPIError

        if isinstance(exc, DBAPIError):  # OperationalError and the other driver errors
            return f"database error: {str(exc.orig or exc).splitlines()[0]}"
    return None
