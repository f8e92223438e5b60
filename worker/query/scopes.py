"""Mirrored subscriptions and orders: seats, pending and claimed counts, last sync, last error."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.config import Settings
from worker.models import Seat, SeatScope
from worker.query.mirror import reading


async def _seat_counts(session: AsyncSession) -> dict[tuple[str, str], dict[str, int]]:
    """(kind, scope id) -> status -> seats Polar still lists."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for column, kind in ((Seat.subscription_id, "subscription"), (Seat.order_id, "order")):
        rows = await session.execute(
            select(col(column), col(Seat.status), func.count())
            .where(col(column).is_not(None), col(Seat.gone_at).is_(None))
            .group_by(col(column), col(Seat.status))
        )
        for scope_id, seat_status, n in rows:
            counts.setdefault((kind, str(scope_id)), {})[seat_status] = int(n)
    return counts


async def scope_rows(session: AsyncSession) -> list[dict[str, Any]]:
    """Every mirrored scope, by kind then id."""
    found = (
        (
            await session.execute(
                select(SeatScope).order_by(col(SeatScope.kind), col(SeatScope.scope_id))
            )
        )
        .scalars()
        .all()
    )
    counts = await _seat_counts(session)
    rows = []
    for s in found:
        by_status = counts.get((s.kind, s.scope_id), {})
        rows.append(
            {
                "kind": s.kind,
                "scope_id": s.scope_id,
                "total_seats": s.total_seats,
                "available_seats": s.available_seats,
                "pending": by_status.get("pending", 0),
                "claimed": by_status.get("claimed", 0),
                "last_synced_at": s.last_synced_at.isoformat() if s.last_synced_at else None,
                "last_error": s.last_error,
                "consecutive_failures": s.consecutive_failures,
                "gone": s.gone_at is not None,
            }
        )
    return rows


async def list_scopes(settings: Settings) -> list[dict[str, Any]]:
    """`seat-sync scopes`: every mirrored subscription and order."""
    async with reading(settings) as mirror, mirror.sessions() as session:
        return await scope_rows(session)
