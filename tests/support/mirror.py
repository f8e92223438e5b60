"""The mirror's database as tests read and seed it: a subscription's seats side by side with
Polar's, the inbox's progress, the deliveries stored, and seat rows written directly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.config import Settings
from worker.intake.routing import ScopeRef
from worker.models import Seat, WebhookDelivery, WebhookDeliveryScope, utcnow
from worker.platform.db import create_engine, session_factory
from worker.simulator.server import SimulatedPolar

SeatView = set[tuple[Any, ...]]


@contextlib.asynccontextmanager
async def reading(database_url: str) -> AsyncIterator[AsyncSession]:
    """A session on its own engine, disposed on exit (for tests without the `sessions`
    fixture, or reading a database that processes write)."""
    engine = create_engine(database_url)
    try:
        async with session_factory(engine)() as session:
            yield session
    finally:
        await engine.dispose()


def polar_view(sim: SimulatedPolar, subscription_id: str) -> SeatView:
    """(id, status, email, member id) of every seat Polar lists for the subscription."""
    seats = sim.state.list_seats(subscription_id=subscription_id)["seats"]
    return {(s["id"], s["status"], s["email"], s["member_id"]) for s in seats}


async def mirror_view(settings: Settings, subscription_id: str) -> SeatView:
    """The same for the mirror's seats of the subscription that are not gone."""
    async with reading(settings.database_url) as session:
        rows = (
            await session.execute(
                select(Seat).where(
                    col(Seat.subscription_id) == subscription_id, col(Seat.gone_at).is_(None)
                )
            )
        ).scalars()
        return {(s.id, s.status, s.email, s.member_id) for s in rows}


async def inbox_counts(settings: Settings) -> dict[str, int]:
    """Deliveries stored, deliveries and delivery scopes still open, deliveries ignored."""
    async with reading(settings.database_url) as session:

        async def count(model: Any, *where: Any) -> int:
            query = select(func.count()).select_from(model).where(*where)
            return int(await session.scalar(query) or 0)

        return {
            "deliveries": await count(WebhookDelivery),
            "open_deliveries": await count(
                WebhookDelivery, col(WebhookDelivery.processed_at).is_(None)
            ),
            "open_scopes": await count(
                WebhookDeliveryScope, col(WebhookDeliveryScope.processed_at).is_(None)
            ),
            "ignored": await count(WebhookDelivery, col(WebhookDelivery.outcome) == "ignored"),
        }


async def delivery_ids(database_url: str) -> list[str]:
    """The webhook id of every delivery the inbox stored."""
    async with reading(database_url) as session:
        return list((await session.execute(select(col(WebhookDelivery.webhook_id)))).scalars())


def mirrored_seat(seat_id: str, scope: ScopeRef, *, status: str = "pending", **values: Any) -> Seat:
    """A seat row of `scope` as a sync would have written it, to add to the mirror."""
    now = utcnow()
    return Seat(
        id=seat_id,
        created_at=now,
        synced_at=now,
        status=status,
        subscription_id=scope.scope_id if scope.kind == "subscription" else None,
        order_id=scope.scope_id if scope.kind == "order" else None,
        **values,
    )
