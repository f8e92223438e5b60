"""Opening the mirror for a read: the checks a read needs first (the SQLite file exists, the
schema is current), then read-only resources; and what a database failure says to a person.

A read never creates, migrates or writes anything: the engine is opened read-only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from worker.config import Settings
from worker.platform.db import is_sqlite, sqlite_path

if TYPE_CHECKING:
    from worker.resources import Resources


class NoDatabaseError(Exception):
    """The SQLite file a read would open does not exist (a read never creates it)."""


def require_database_file(settings: Settings) -> None:
    """Raise NoDatabaseError, saying how to create it, when the SQLite file is missing."""
    if is_sqlite(settings.database_url):
        path = sqlite_path(settings.database_url)
        if path is not None and not path.exists():
            raise NoDatabaseError(
                f"no database at {path}: run `seat-sync db upgrade` (or `seat-sync run`) to "
                "create it, or set DATABASE_URL"
            )


async def running_redis_url(settings: Settings) -> str | None:
    """REDIS_URL when set; else the private Redis's socket when one is serving there. A read
    never starts a Redis: without one, what only Redis knows is reported as unknown."""
    from worker.platform.redis import ping, socket_url

    if settings.redis_url is not None:
        return settings.redis_url
    url = socket_url(settings.data_dir)
    return url if await ping(url) else None


@contextlib.asynccontextmanager
async def reading(settings: Settings) -> AsyncIterator[Resources]:
    """Read-only resources for a query: the database, opened read-only after the checks
    above. Nothing else: a query needs neither Polar nor the queue."""
    from worker.platform.migrate import check_schema
    from worker.resources import Resources

    require_database_file(settings)
    mirror = await Resources.create(settings, read_only=True)
    try:
        await check_schema(mirror.engine)
        yield mirror
    finally:
        await mirror.aclose()


def database_failure(exc: BaseException) -> str | None:
    """One line for a database failure (refused connection, bad credentials, locked file):
    the first line of the driver's own message, without the statement and parameters
    SQLAlchemy appends. None when `exc` is not a database failure."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):  # OperationalError and the other driver errors
        return f"database error: {str(exc.orig or exc).splitlines()[0]}"
    return None
