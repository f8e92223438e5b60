"""Mirrored subscriptions and orders: seats, pending and claimed counts, last sync, last error."""

from __future__ import annotations

from typing import Any

from worker.query.environment import MirrorConfig
from worker.query.mirror import Mirror, iso, open_mirror

SCOPE_SQL = (
    "SELECT kind, scope_id, total_seats, available_seats, last_synced_at, last_error, "
    "consecutive_failures, gone_at FROM seat_scope ORDER BY kind, scope_id"
)
# Seats Polar still lists, per scope and status (the (scope column, status) indexes).
COUNT_SQL = {
    kind: f"SELECT {column} AS scope_id, status, count(*) AS n FROM seat "  # noqa: S608
    f"WHERE {column} IS NOT NULL AND gone_at IS NULL GROUP BY {column}, status"
    for kind, column in (("subscription", "subscription_id"), ("order", "order_id"))
}


def scope_rows(mirror: Mirror) -> list[dict[str, Any]]:
    """Every mirrored scope, by kind then id."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for kind, sql in COUNT_SQL.items():
        for row in mirror.rows(sql):
            counts.setdefault((kind, str(row["scope_id"])), {})[row["status"]] = int(row["n"])
    rows = []
    for s in mirror.rows(SCOPE_SQL):
        by_status = counts.get((s["kind"], s["scope_id"]), {})
        rows.append(
            {
                "kind": s["kind"],
                "scope_id": s["scope_id"],
                "total_seats": s["total_seats"],
                "available_seats": s["available_seats"],
                "pending": by_status.get("pending", 0),
                "claimed": by_status.get("claimed", 0),
                "last_synced_at": iso(s["last_synced_at"]),
                "last_error": s["last_error"],
                "consecutive_failures": s["consecutive_failures"],
                "gone": s["gone_at"] is not None,
            }
        )
    return rows


def list_scopes(config: MirrorConfig) -> list[dict[str, Any]]:
    """`seat-sync scopes`: every mirrored subscription and order."""
    with open_mirror(config) as mirror:
        return scope_rows(mirror)
