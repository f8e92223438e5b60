"""Reconcile driven directly against the test's database: one transaction per listing, as
a sync job runs it, and the rows it leaves."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from worker.models import Seat, SeatChange
from worker.platform.db import retry_transaction
from worker.polar.schemas import SeatsList
from worker.simulator.state import SimState
from worker.sync.reconcile import ReconcileResult, reconcile_scope

EMAILS = ("ann@example.com", "bo@example.com", "cy@example.com")


def subscription(state: SimState, emails: tuple[str, ...] = EMAILS) -> str:
    """A subscription of Polar's with one pending seat per address (metadata included)."""
    scope_id = str(state.create_subscription(seats=len(emails) + 1)["id"])
    for number, email in enumerate(emails):
        state.assign(
            subscription_id=scope_id, email=email, metadata={"team": "a", "number": number}
        )
    return scope_id


async def reconcile(
    sessions: async_sessionmaker[AsyncSession],
    seats: SeatsList,
    *,
    scope_id: str,
    kind: str = "subscription",
    fetch_started_at: datetime | None = None,
    trust_digests: bool = True,
) -> ReconcileResult:
    """Reconcile one scope's listing in its own transaction (fetched now by default);
    `trust_digests=False` compares every stored row in full, as `verify --repair` does."""
    started = fetch_started_at or datetime.now(UTC)

    async def work(session: AsyncSession) -> ReconcileResult:
        return await reconcile_scope(
            session,
            kind=kind,
            scope_id=scope_id,
            seats=seats,
            fetch_started_at=started,
            now=datetime.now(UTC),
            trust_digests=trust_digests,
        )

    return await retry_transaction(sessions, work)


async def mirrored_seats(sessions: async_sessionmaker[AsyncSession]) -> dict[str, Seat]:
    """Every seat row, gone ones included, by id."""
    async with sessions() as session:
        return {s.id: s for s in (await session.execute(select(Seat))).scalars()}


async def seat_changes(
    sessions: async_sessionmaker[AsyncSession], seat_id: str | None = None
) -> list[SeatChange]:
    """The history rows, oldest first: of one seat, or of all."""
    query = select(SeatChange).order_by(col(SeatChange.id))
    if seat_id is not None:
        query = query.where(col(SeatChange.seat_id) == seat_id)
    async with sessions() as session:
        return list((await session.execute(query)).scalars())


async def row_states(sessions: async_sessionmaker[AsyncSession]) -> dict[str, tuple[Any, ...]]:
    """Each seat row's (synced_at, polar_digest): what a sync that writes nothing keeps."""
    return {k: (v.synced_at, v.polar_digest) for k, v in (await mirrored_seats(sessions)).items()}
