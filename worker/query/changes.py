"""The change feed: seat_change rows after a cursor, in id order, for provisioning scripts.

A consumer that keeps the last `id` it handled and asks for the rows after it sees every
row exactly once, because ids become visible in increasing order on both backends:
- SQLite has one writer at a time, and a row's id is drawn inside its write transaction
  (the newest row is never pruned, so an id is never drawn twice: see retention);
- PostgreSQL draws ids from a sequence before commit, so two writers could commit out of
  id order; a statement trigger on seat_change (migration 0003) makes every inserting
  transaction take one advisory lock before its ids are drawn and hold it until it ends,
  so a transaction that holds a lower id has always committed (or rolled back) before a
  higher id is drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from worker.query.environment import MirrorConfig
from worker.query.mirror import Mirror, open_mirror
from worker.query.seats import CHANGE_SQL, change_json

PAGE = 1000


def changes_after(mirror: Mirror, after: int, *, limit: int = PAGE) -> list[dict[str, Any]]:
    """Up to `limit` seat_change rows with an id above `after`, in id order."""
    rows = mirror.rows(
        CHANGE_SQL + " WHERE id > :after ORDER BY id LIMIT :limit",
        {"after": after, "limit": limit},
    )
    return [change_json(row) for row in rows]


def feed(
    config: MirrorConfig,
    after: int,
    *,
    follow: bool,
    limit: int | None = None,
    wait: Callable[[], None],
) -> Generator[dict[str, Any], None, None]:
    """Rows after `after` in id order: until none is left (or `limit` rows), or, when
    `follow`, for ever, calling `wait()` whenever it has caught up."""
    left = limit
    with open_mirror(config) as mirror:
        while left is None or left > 0:
            page = changes_after(mirror, after, limit=min(PAGE, left) if left else PAGE)
            yield from page
            if page:
                after = int(page[-1]["id"])
                if left is not None:
                    left -= len(page)
                continue
            if not follow:
                return
            wait()
