"""Seat history from seat_change: the seats a person held, and who lost access."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.query.environment import MirrorConfig
from worker.query.mirror import Mirror, iso, open_mirror

HELD_STATUSES = ("pending", "claimed")
_CHANGES_SQL = (
    "SELECT id, seat_id, scope_kind, scope_id, observed_at, change, old_status, new_status, "
    "old_email, new_email, old_member_id, new_member_id FROM seat_change"
)

Change = Mapping[str, Any]


def _changes(
    mirror: Mirror, *, within: timedelta | None, email: str | None = None
) -> list[dict[str, Any]]:
    """seat_change rows in the order observed, optionally only recent ones or one person's."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if within is not None:
        where.append("observed_at >= :since")
        params["since"] = mirror.stamp(datetime.now(UTC) - within)
    if email is not None:
        where.append("(lower(old_email) = :email OR lower(new_email) = :email)")
        params["email"] = email
    sql = _CHANGES_SQL + (" WHERE " + " AND ".join(where) if where else "")
    return mirror.rows(sql + " ORDER BY observed_at, id", params)


def _lost(change: Change) -> bool:
    """The holder of a pending or claimed seat lost it: revoked, gone, or handed to another."""
    old_email = change["old_email"]
    if old_email is None or change["old_status"] not in HELD_STATUSES:
        return False
    return bool(
        change["new_status"] == "revoked"
        or change["change"] == "gone"
        or (change["new_email"] or "").lower() != old_email.lower()
    )


def lost_access_rows(mirror: Mirror, *, within: timedelta | None) -> list[dict[str, Any]]:
    """Who lost a seat (within the window), oldest first, with who got the slot instead."""
    return [
        {
            "lost_at": iso(c["observed_at"]),
            "email": c["old_email"],
            "member_id": c["old_member_id"],
            "seat_id": c["seat_id"],
            "scope_kind": c["scope_kind"],
            "scope_id": c["scope_id"],
            "was": c["old_status"],
            "now": c["new_status"],
            "replaced_by": c["new_email"],
        }
        for c in _changes(mirror, within=within)
        if _lost(c)
    ]


def tenures(changes: Sequence[Change], email: str) -> list[dict[str, Any]]:
    """Fold a person's seat_change rows into one row per seat tenure (start .. end)."""
    wanted = email.strip().lower()
    open_by_seat: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    for c in changes:
        holds_now = (c["new_email"] or "").lower() == wanted and c["change"] != "gone"
        held = (c["old_email"] or "").lower() == wanted
        tenure = open_by_seat.get(c["seat_id"])
        observed = iso(c["observed_at"])
        if holds_now and tenure is None:
            open_by_seat[c["seat_id"]] = {
                "seat_id": c["seat_id"],
                "scope_kind": c["scope_kind"],
                "scope_id": c["scope_id"],
                "started_at": observed,
                "ended_at": None,
                "status": c["new_status"],
            }
        elif holds_now and tenure is not None:
            tenure["status"] = c["new_status"]
        elif held and tenure is not None:
            tenure["ended_at"] = observed
            tenure["status"] = c["new_status"] if c["change"] != "gone" else "gone"
            done.append(open_by_seat.pop(c["seat_id"]))
        elif held:  # held before the history window we read
            done.append(
                {
                    "seat_id": c["seat_id"],
                    "scope_kind": c["scope_kind"],
                    "scope_id": c["scope_id"],
                    "started_at": None,
                    "ended_at": observed,
                    "status": c["new_status"],
                }
            )
    return sorted(done + list(open_by_seat.values()), key=lambda r: r["started_at"] or "")


def held_rows(mirror: Mirror, email: str, *, within: timedelta | None) -> list[dict[str, Any]]:
    """Every seat `email` held (case-insensitive), one row per tenure, by start."""
    wanted = email.strip().lower()
    return tenures(_changes(mirror, within=within, email=wanted), wanted)


def seats_held(
    config: MirrorConfig, email: str, *, within: timedelta | None
) -> list[dict[str, Any]]:
    """`seat-sync history --email E`."""
    with open_mirror(config) as mirror:
        return held_rows(mirror, email, within=within)


def lost_access(config: MirrorConfig, *, within: timedelta | None) -> list[dict[str, Any]]:
    """`seat-sync history --lost`."""
    with open_mirror(config) as mirror:
        return lost_access_rows(mirror, within=within)
