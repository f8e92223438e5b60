"""Seat history from seat_change: the seats a person held, and who lost access."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.config import Settings
from worker.models import SeatChange, utcnow
from worker.query.mirror import reading

HELD_STATUSES = ("pending", "claimed")


async def _changes(
    session: AsyncSession, *, within: timedelta | None, email: str | None = None
) -> Sequence[SeatChange]:
    """seat_change rows in the order observed, optionally only recent ones or one person's."""
    query = select(SeatChange).order_by(col(SeatChange.observed_at), col(SeatChange.id))
    if within is not None:
        query = query.where(col(SeatChange.observed_at) >= utcnow() - within)
    if email is not None:
        query = query.where(
            (func.lower(col(SeatChange.old_email)) == email)
            | (func.lower(col(SeatChange.new_email)) == email)
        )
    return (await session.execute(query)).scalars().all()


def _lost(change: SeatChange) -> bool:
    """The holder of a pending or claimed seat lost it: revoked, gone, or handed to another."""
    if change.old_email is None or change.old_status not in HELD_STATUSES:
        return False
    return (
        change.new_status == "revoked"
        or change.change == "gone"
        or (change.new_email or "").lower() != change.old_email.lower()
    )


async def lost_access_rows(
    session: AsyncSession, *, within: timedelta | None
) -> list[dict[str, Any]]:
    """Who lost a seat (within the window), oldest first, with who got the slot instead."""
    return [
        {
            "lost_at": c.observed_at.isoformat(),
            "email": c.old_email,
            "member_id": c.old_member_id,
            "seat_id": c.seat_id,
            "scope_kind": c.scope_kind,
            "scope_id": c.scope_id,
            "was": c.old_status,
            "now": c.new_status,
            "replaced_by": c.new_email,
        }
        for c in await _changes(session, within=within)
        if _lost(c)
    ]


def tenures(changes: Sequence[SeatChange], email: str) -> list[dict[str, Any]]:
    """Fold a person's seat_change rows into one row per seat tenure (start .. end)."""
    wanted = email.strip().lower()
    open_by_seat: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    for c in changes:
        holds_now = (c.new_email or "").lower() == wanted and c.change != "gone"
        held = (c.old_email or "").lower() == wanted
        tenure = open_by_seat.get(c.seat_id)
        if holds_now and tenure is None:
            open_by_seat[c.seat_id] = {
                "seat_id": c.seat_id,
                "scope_kind": c.scope_kind,
                "scope_id": c.scope_id,
                "started_at": c.observed_at.isoformat(),
                "ended_at": None,
                "status": c.new_status,
            }
        elif holds_now and tenure is not None:
            tenure["status"] = c.new_status
        elif held and tenure is not None:
            tenure["ended_at"] = c.observed_at.isoformat()
            tenure["status"] = c.new_status if c.change != "gone" else "gone"
            done.append(open_by_seat.pop(c.seat_id))
        elif held:  # held before the history window we read
            done.append(
                {
                    "seat_id": c.seat_id,
                    "scope_kind": c.scope_kind,
                    "scope_id": c.scope_id,
                    "started_at": None,
                    "ended_at": c.observed_at.isoformat(),
                    "status": c.new_status,
                }
            )
    return sorted(done + list(open_by_seat.values()), key=lambda r: r["started_at"] or "")


async def held_rows(
    session: AsyncSession, email: str, *, within: timedelta | None
) -> list[dict[str, Any]]:
    """Every seat `email` held (case-insensitive), one row per tenure, by start."""
    wanted = email.strip().lower()
    return tenures(await _changes(session, within=within, email=wanted), wanted)


async def seats_held(
    settings: Settings, email: str, *, within: timedelta | None
) -> list[dict[str, Any]]:
    """`seat-sync history --email E`."""
    async with reading(settings) as mirror, mirror.sessions() as session:
        return await held_rows(session, email, within=within)


async def lost_access(settings: Settings, *, within: timedelta | None) -> list[dict[str, Any]]:
    """`seat-sync history --lost`."""
    async with reading(settings) as mirror, mirror.sessions() as session:
        return await lost_access_rows(session, within=within)
