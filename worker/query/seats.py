"""Seats in the mirror: a filtered list (every CustomerSeat key), and one seat with its history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.config import Settings
from worker.models import Seat, SeatChange, seat_json, utcnow
from worker.query.mirror import reading


@dataclass(frozen=True, kw_only=True)
class SeatFilter:
    """Which seats to list; every field narrows the list, None means any."""

    subscription_id: str | None = None
    order_id: str | None = None
    status: str | None = None
    email: str | None = None
    """Matched case-insensitively."""
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


async def matching_seats(
    session: AsyncSession, wanted: SeatFilter, *, now: datetime | None = None
) -> list[dict[str, Any]]:
    """The seats `wanted` selects, by scope then creation, each as a CustomerSeat object."""
    now = now or utcnow()
    query = select(Seat).order_by(
        col(Seat.subscription_id), col(Seat.order_id), col(Seat.created_at), col(Seat.id)
    )
    if wanted.subscription_id is not None:
        query = query.where(col(Seat.subscription_id) == wanted.subscription_id)
    if wanted.order_id is not None:
        query = query.where(col(Seat.order_id) == wanted.order_id)
    if wanted.status is not None:
        query = query.where(col(Seat.status) == wanted.status)
    if wanted.email is not None:
        query = query.where(func.lower(col(Seat.email)) == wanted.email.strip().lower())
    if wanted.member_id is not None:
        query = query.where(col(Seat.member_id) == wanted.member_id)
    if wanted.customer_id is not None:
        query = query.where(col(Seat.customer_id) == wanted.customer_id)
    if wanted.expiring_within is not None:
        query = query.where(
            col(Seat.status) == "pending",
            col(Seat.invitation_token_expires_at) > now,
            col(Seat.invitation_token_expires_at) <= now + wanted.expiring_within,
        )
    if wanted.expired:
        query = query.where(
            col(Seat.status) == "pending", col(Seat.invitation_token_expires_at) <= now
        )
    if not wanted.include_gone:
        query = query.where(col(Seat.gone_at).is_(None))
    return [seat_json(s) for s in (await session.execute(query)).scalars()]


def change_json(change: SeatChange) -> dict[str, Any]:
    """One seat_change row as printed: when, which seat and scope, old and new state."""
    return {
        "observed_at": change.observed_at.isoformat(),
        "seat_id": change.seat_id,
        "scope_kind": change.scope_kind,
        "scope_id": change.scope_id,
        "change": change.change,
        "old_status": change.old_status,
        "new_status": change.new_status,
        "old_email": change.old_email,
        "new_email": change.new_email,
        "old_member_id": change.old_member_id,
        "new_member_id": change.new_member_id,
        "old_customer_id": change.old_customer_id,
        "new_customer_id": change.new_customer_id,
    }


async def seat_changes(session: AsyncSession, seat_id: str) -> list[dict[str, Any]]:
    """Every observed change of one seat, in the order it was recorded."""
    rows = await session.execute(
        select(SeatChange).where(col(SeatChange.seat_id) == seat_id).order_by(col(SeatChange.id))
    )
    return [change_json(c) for c in rows.scalars()]


async def find_seats(settings: Settings, wanted: SeatFilter) -> list[dict[str, Any]]:
    """`seat-sync seats`: the seats `wanted` selects."""
    async with reading(settings) as mirror, mirror.sessions() as session:
        return await matching_seats(session, wanted)


async def seat_detail(settings: Settings, seat_id: str) -> SeatDetail | None:
    """`seat-sync seat ID`: the seat and its history; None when the mirror has no such seat."""
    async with reading(settings) as mirror, mirror.sessions() as session:
        found = await session.get(Seat, seat_id)
        if found is None:
            return None
        return SeatDetail(seat_json(found), await seat_changes(session, seat_id))
