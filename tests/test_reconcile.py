"""Reconcile against a real database: Polar's seat lifecycle (slots reused, revoke nulls)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from tests.support.reconcile import mirrored_seats, reconcile, seat_changes
from worker.models import SeatChange, SeatScope, seat_json
from worker.platform.db import create_engine, session_factory
from worker.polar.schemas import CustomerSeat, SeatsList
from worker.sync.reconcile import ReconcileResult

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
SUB = str(uuid.uuid4())


def seat(
    seat_id: str,
    *,
    status: str = "pending",
    email: str | None = "alice@example.com",
    member_id: str | None = None,
    modified: datetime | None = None,
    **extra: Any,
) -> dict[str, Any]:
    member = None
    if email is not None and status != "revoked":
        member_id = member_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, email))
        member = {
            "id": member_id,
            "created_at": T0.isoformat(),
            "modified_at": None,
            "customer_id": "cust-1",
            "email": email,
            "name": None,
            "external_id": None,
            "role": "member",
        }
    data = {
        "id": seat_id,
        "created_at": T0.isoformat(),
        "modified_at": (modified or T0).isoformat(),
        "subscription_id": SUB,
        "order_id": None,
        "status": status,
        "customer_id": "cust-1" if member else None,
        "member_id": member_id if member else None,
        "member": member,
        "email": email if status != "revoked" else None,
        "customer_email": "buyer@example.com",
        "invitation_token_expires_at": (T0 + timedelta(hours=24)).isoformat(),
        "claimed_at": (T0 + timedelta(hours=1)).isoformat() if status == "claimed" else None,
        "revoked_at": (T0 + timedelta(hours=2)).isoformat() if status == "revoked" else None,
        "seat_metadata": {"team": "a"},
    }
    data.update(extra)
    return data


def seats_list(*seats: dict[str, Any], total: int = 5) -> SeatsList:
    used = sum(1 for s in seats if s["status"] in ("pending", "claimed"))
    return SeatsList(
        seats=[CustomerSeat.model_validate(s) for s in seats],
        total_seats=total,
        available_seats=max(0, total - used),
    )


async def apply(
    sessions: async_sessionmaker[AsyncSession],
    listing: SeatsList,
    *,
    fetch_started_at: datetime | None = None,
) -> ReconcileResult:
    return await reconcile(sessions, listing, scope_id=SUB, fetch_started_at=fetch_started_at)


async def test_first_sync_mirrors_every_key(sessions: async_sessionmaker[AsyncSession]) -> None:
    a, b = seat("s1"), seat("s2", status="claimed", email="bob@example.com")
    result = await apply(sessions, seats_list(a, b))
    assert (result.inserted, result.updated, result.unchanged) == (2, 0, 0)
    mirrored = await mirrored_seats(sessions)
    for original in (a, b):
        expected = CustomerSeat.model_validate(original).model_dump(mode="json")
        got = CustomerSeat.model_validate(seat_json(mirrored[original["id"]])).model_dump(
            mode="json"
        )
        assert got == expected
    async with sessions() as session:
        scope = await session.get(SeatScope, ("subscription", SUB))
    assert scope is not None
    assert (scope.total_seats, scope.available_seats, scope.consecutive_failures) == (5, 3, 0)
    assert scope.last_synced_at is not None


async def test_same_list_twice_writes_nothing(sessions: async_sessionmaker[AsyncSession]) -> None:
    listing = seats_list(seat("s1"), seat("s2", status="claimed", email="bob@example.com"))
    await apply(sessions, listing)
    before = {k: v.synced_at for k, v in (await mirrored_seats(sessions)).items()}
    result = await apply(sessions, listing)
    assert (result.inserted, result.updated, result.unchanged, result.written) == (0, 0, 2, 0)
    after = {k: v.synced_at for k, v in (await mirrored_seats(sessions)).items()}
    assert after == before
    async with sessions() as session:
        changes = (await session.execute(select(func.count()).select_from(SeatChange))).scalar_one()
    assert changes == 2  # the two "created" rows only


async def test_claim_is_recorded_as_a_status_change(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await apply(sessions, seats_list(seat("s1")))
    result = await apply(sessions, seats_list(seat("s1", status="claimed")))
    assert result.updated == 1
    rows = await seat_changes(sessions, "s1")
    assert [(r.change, r.old_status, r.new_status) for r in rows] == [
        ("created", None, "pending"),
        ("status", "pending", "claimed"),
    ]


async def test_revoke_keeps_the_holder_in_history(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await apply(sessions, seats_list(seat("s1", status="claimed", email="carol@example.com")))
    await apply(sessions, seats_list(seat("s1", status="revoked", email=None)))
    mirrored = (await mirrored_seats(sessions))["s1"]
    assert mirrored.status == "revoked"
    assert mirrored.email is None and mirrored.member_id is None  # Polar nulled them
    last = (await seat_changes(sessions, "s1"))[-1]
    assert (last.old_status, last.new_status) == ("claimed", "revoked")
    assert last.old_email == "carol@example.com"
    assert last.old_member_id is not None
    assert last.new_email is None


async def test_reused_slot_is_a_change_not_a_conflict(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await apply(sessions, seats_list(seat("s1", status="claimed", email="dan@example.com")))
    await apply(sessions, seats_list(seat("s1", status="revoked", email=None)))
    await apply(sessions, seats_list(seat("s1", status="pending", email="erin@example.com")))
    mirrored = await mirrored_seats(sessions)
    assert len(mirrored) == 1
    assert mirrored["s1"].email == "erin@example.com" and mirrored["s1"].status == "pending"
    rows = await seat_changes(sessions, "s1")
    assert [(r.old_email, r.new_email) for r in rows] == [
        (None, "dan@example.com"),
        ("dan@example.com", None),
        (None, "erin@example.com"),
    ]


async def test_missed_revoke_still_shows_who_lost_access(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # The revoke webhook was lost: we go straight from Frank's claim to Gina's invitation.
    await apply(sessions, seats_list(seat("s1", status="claimed", email="frank@example.com")))
    await apply(sessions, seats_list(seat("s1", status="pending", email="gina@example.com")))
    last = (await seat_changes(sessions, "s1"))[-1]
    assert (last.change, last.old_email, last.new_email) == (
        "status",
        "frank@example.com",
        "gina@example.com",
    )


async def test_vanished_seat_is_marked_gone_not_deleted(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await apply(sessions, seats_list(seat("s1"), seat("s2", email="hank@example.com")))
    result = await apply(sessions, seats_list(seat("s1")))
    assert result.gone == 1
    mirrored = await mirrored_seats(sessions)
    assert mirrored["s2"].gone_at is not None and mirrored["s1"].gone_at is None
    assert (await seat_changes(sessions, "s2"))[-1].change == "gone"
    again = await apply(sessions, seats_list(seat("s1")))
    assert again.written == 0


async def test_an_older_fetch_never_overwrites_a_newer_one(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    now = datetime.now(UTC)
    await apply(sessions, seats_list(seat("s1", status="claimed")), fetch_started_at=now)
    stale = await apply(
        sessions, seats_list(seat("s1")), fetch_started_at=now - timedelta(seconds=5)
    )
    assert stale.stale
    assert (await mirrored_seats(sessions))["s1"].status == "claimed"


async def test_member_email_rewrite_is_a_holder_change(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    member_id = str(uuid.uuid4())
    await apply(
        sessions,
        seats_list(seat("s1", status="claimed", email="ivy@old.example", member_id=member_id)),
    )
    await apply(
        sessions,
        seats_list(seat("s1", status="claimed", email="ivy@new.example", member_id=member_id)),
    )
    last = (await seat_changes(sessions, "s1"))[-1]
    assert (last.change, last.old_email, last.new_email) == (
        "holder",
        "ivy@old.example",
        "ivy@new.example",
    )


async def test_concurrent_reconciles_of_one_scope(
    sessions: async_sessionmaker[AsyncSession], database_url: str
) -> None:
    listing = seats_list(*(seat(f"s{i}", email=f"p{i}@example.com") for i in range(40)), total=40)
    # Separate engines, as two worker processes would have.
    engines = [create_engine(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(apply(session_factory(e), listing) for e in engines))
    finally:
        for e in engines:
            await e.dispose()
    assert sum(r.inserted for r in results) == 40
    assert len(await mirrored_seats(sessions)) == 40
    async with sessions() as session:
        created = (
            await session.execute(
                select(func.count())
                .select_from(SeatChange)
                .where(col(SeatChange.change) == "created")
            )
        ).scalar_one()
    assert created == 40
