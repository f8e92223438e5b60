"""Seats in the mirror: a filtered list (every CustomerSeat key), and one seat with its history.

Plain SQL run by either driver (`worker.query.mirror`); the ORM session variants at the end
serve the demo, which reads its mirror inside a running event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from worker.query.environment import MirrorConfig
from worker.query.mirror import (
    Mirror,
    iso,
    iso_z,
    json_value,
    like_escaped,
    open_mirror,
    sqlite_stamp,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

# A seat id given by its first characters (as the table prints it) needs at least these.
MIN_ID_PREFIX = 4

SEAT_SQL = "SELECT * FROM seat"
CHANGE_KEYS = (
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
)
CHANGE_SQL = f"SELECT {', '.join(CHANGE_KEYS)} FROM seat_change"  # noqa: S608


@dataclass(frozen=True, kw_only=True)
class SeatFilter:
    """Which seats to list; every field narrows the list, None means any."""

    subscription_id: str | None = None
    order_id: str | None = None
    status: str | None = None
    email: str | None = None
    """The seat's address, matched case-insensitively: `email`, or `customer_email` in
    organisations without Polar's member model (where `email` is null)."""
    member_id: str | None = None
    customer_id: str | None = None
    expiring_within: timedelta | None = None
    """Pending invitations that expire within this window from now (not yet expired)."""
    expired: bool = False
    """Pending invitations already expired."""
    include_gone: bool = False
    """Also seats Polar no longer lists."""


@dataclass(frozen=True)
class SeatDetail:
    seat: dict[str, Any]
    """The seat as Polar's CustomerSeat object."""
    history: list[dict[str, Any]]
    """Its seat_change rows, oldest first."""


class AmbiguousSeatError(Exception):
    """A shortened seat id matches more than one seat."""


def seat_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored seat row as Polar's CustomerSeat object (every key), the nested member
    rebuilt from the member_* columns (present when member_created_at is set)."""
    member: dict[str, Any] | None = None
    if row["member_created_at"] is not None:
        member = {
            "id": row["member_id"],
            "created_at": iso_z(row["member_created_at"]),
            "modified_at": iso_z(row["member_modified_at"]),
            "customer_id": row["member_customer_id"],
            "email": row["member_email"],
            "name": row["member_name"],
            "external_id": row["member_external_id"],
            "role": row["member_role"],
        }
    return {
        "id": row["id"],
        "created_at": iso_z(row["created_at"]),
        "modified_at": iso_z(row["modified_at"]),
        "subscription_id": row["subscription_id"],
        "order_id": row["order_id"],
        "status": row["status"],
        "customer_id": row["customer_id"],
        "member_id": row["member_id"],
        "member": member,
        "email": row["email"],
        "customer_email": row["customer_email"],
        "invitation_token_expires_at": iso_z(row["invitation_token_expires_at"]),
        "claimed_at": iso_z(row["claimed_at"]),
        "revoked_at": iso_z(row["revoked_at"]),
        "seat_metadata": json_value(row["seat_metadata"]),
    }


def change_json(row: Mapping[Any, Any]) -> dict[str, Any]:
    """One seat_change row as printed: its id (the feed's cursor), when, which seat and
    scope, old and new state."""
    return {key: iso(row[key]) if key == "observed_at" else row[key] for key in CHANGE_KEYS}


def seats_query(wanted: SeatFilter, now: datetime, stamp: Any) -> tuple[str, dict[str, Any]]:
    """The SELECT for `wanted` (by scope, then creation) and its parameters; `stamp` turns
    a moment into the backend's timestamp parameter."""
    where: list[str] = []
    params: dict[str, Any] = {}
    for column in ("subscription_id", "order_id", "status", "member_id", "customer_id"):
        value = getattr(wanted, column)
        if value is not None:
            where.append(f"{column} = :{column}")
            params[column] = value
    if wanted.email is not None:
        where.append("lower(coalesce(email, customer_email)) = :email")
        params["email"] = wanted.email.strip().lower()
    if wanted.expiring_within is not None:
        where.append("status = 'pending'")
        where.append("invitation_token_expires_at > :now")
        where.append("invitation_token_expires_at <= :until")
        params["now"] = stamp(now)
        params["until"] = stamp(now + wanted.expiring_within)
    if wanted.expired:
        where.append("status = 'pending'")
        where.append("invitation_token_expires_at <= :now")
        params["now"] = stamp(now)
    if not wanted.include_gone:
        where.append("gone_at IS NULL")
    sql = SEAT_SQL
    if where:
        sql += " WHERE " + " AND ".join(where)
    # NULLs first on both backends, as the ORM query ordered them.
    sql += (
        " ORDER BY subscription_id IS NOT NULL, subscription_id, order_id IS NOT NULL,"
        " order_id, created_at, id"
    )
    return sql, params


def matching(mirror: Mirror, wanted: SeatFilter) -> list[dict[str, Any]]:
    sql, params = seats_query(wanted, datetime.now(UTC), mirror.stamp)
    return [seat_json(row) for row in mirror.rows(sql, params)]


def resolve_seat_id(mirror: Mirror, given: str) -> str | None:
    """The id of the seat `given` names: its whole id, or (as the seats table prints it)
    its first characters when they match exactly one seat. None when none matches."""
    given = given.strip()
    if mirror.rows("SELECT id FROM seat WHERE id = :id", {"id": given}):
        return given
    if len(given) < MIN_ID_PREFIX:
        return None
    found = mirror.rows(
        "SELECT id FROM seat WHERE id LIKE :prefix ESCAPE '\\' ORDER BY id LIMIT 2",
        {"prefix": like_escaped(given) + "%"},
    )
    if len(found) > 1:
        raise AmbiguousSeatError(
            f"{given} is the start of more than one seat id ({found[0]['id']}, "
            f"{found[1]['id']}, ...): give more of it"
        )
    return str(found[0]["id"]) if found else None


def history_of(mirror: Mirror, seat_id: str) -> list[dict[str, Any]]:
    rows = mirror.rows(CHANGE_SQL + " WHERE seat_id = :seat_id ORDER BY id", {"seat_id": seat_id})
    return [change_json(row) for row in rows]


def find_seats(config: MirrorConfig, wanted: SeatFilter) -> list[dict[str, Any]]:
    """`seat-sync seats`: the seats `wanted` selects."""
    with open_mirror(config) as mirror:
        return matching(mirror, wanted)


def seat_detail(config: MirrorConfig, given: str) -> SeatDetail | None:
    """`seat-sync seat ID`: the seat (by id or unambiguous id prefix) and its history;
    None when the mirror has no such seat."""
    with open_mirror(config) as mirror:
        seat_id = resolve_seat_id(mirror, given)
        if seat_id is None:
            return None
        [row] = mirror.rows(SEAT_SQL + " WHERE id = :id", {"id": seat_id})
        return SeatDetail(seat_json(row), history_of(mirror, seat_id))


def seat_scope(config: MirrorConfig, given: str) -> tuple[str, str, str] | None:
    """(seat id, scope kind, scope id) of a mirrored seat given by id or id prefix."""
    with open_mirror(config) as mirror:
        seat_id = resolve_seat_id(mirror, given)
        if seat_id is None:
            return None
        [row] = mirror.rows(
            "SELECT subscription_id, order_id FROM seat WHERE id = :id", {"id": seat_id}
        )
    if row["subscription_id"] is not None:
        return seat_id, "subscription", str(row["subscription_id"])
    return seat_id, "order", str(row["order_id"])


# ---------------------------------------------------------------------- ORM sessions


def _stamper(session: AsyncSession) -> Any:
    if session.get_bind().dialect.name == "sqlite":
        return sqlite_stamp
    return lambda moment: moment.astimezone(UTC)


async def matching_seats(
    session: AsyncSession, wanted: SeatFilter, *, now: datetime | None = None
) -> list[dict[str, Any]]:
    """The seats `wanted` selects, by scope then creation, each as a CustomerSeat object."""
    from sqlalchemy import text

    sql, params = seats_query(wanted, now or datetime.now(UTC), _stamper(session))
    result = await session.execute(text(sql), params)
    return [seat_json(row) for row in result.mappings()]


async def seat_changes(session: AsyncSession, seat_id: str) -> list[dict[str, Any]]:
    """Every observed change of one seat, in the order it was recorded."""
    from sqlalchemy import text

    result = await session.execute(
        text(CHANGE_SQL + " WHERE seat_id = :seat_id ORDER BY id"), {"seat_id": seat_id}
    )
    return [change_json(row) for row in result.mappings()]


async def mirrored_seat(session: AsyncSession, seat_id: str) -> dict[str, Any] | None:
    """One seat as the mirror holds it (a CustomerSeat object), or None."""
    from sqlalchemy import text

    result = await session.execute(text(SEAT_SQL + " WHERE id = :id"), {"id": seat_id})
    row = result.mappings().first()
    return None if row is None else seat_json(row)
