"""Reconcile's diff -> plan -> write, against a real database: values are compared in the
form the database stores them, so what an earlier writer stored, Polar's other spellings of
the same value, and seat ids Polar lists under a second container all come out right."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from tests.support.reconcile import mirrored_seats as seats_by_id
from tests.support.reconcile import reconcile
from tests.support.reconcile import seat_changes as changes
from worker.models import Seat, SeatScope, WebhookDelivery, WebhookDeliveryScope
from worker.polar.schemas import CustomerSeat, SeatsList
from worker.sync.reconcile import ReconcileResult, seat_row

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
Sessions = async_sessionmaker[AsyncSession]


def polar_seat(
    scope_id: str, number: int, *, kind: str = "subscription", **extra: Any
) -> dict[str, Any]:
    """A claimed seat as Polar lists it (member model on)."""
    email = f"p{number}@example.com"
    member_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, email))
    data: dict[str, Any] = {
        "id": f"seat-{scope_id}-{number}",
        "created_at": T0.isoformat(),
        "modified_at": (T0 + timedelta(minutes=number, microseconds=number)).isoformat(),
        "subscription_id": scope_id if kind == "subscription" else None,
        "order_id": scope_id if kind == "order" else None,
        "status": "claimed",
        "customer_id": "cust-1",
        "member_id": member_id,
        "member": {
            "id": member_id,
            "created_at": T0.isoformat(),
            "modified_at": None,
            "customer_id": "cust-1",
            "email": email,
            "name": f"Person {number}",
            "external_id": None,
            "role": "member",
        },
        "email": email,
        "customer_email": "buyer@example.com",
        "invitation_token_expires_at": (T0 + timedelta(hours=24)).isoformat(),
        "claimed_at": (T0 + timedelta(hours=1)).isoformat(),
        "revoked_at": None,
        "seat_metadata": {"team": "a", "level": number},
    }
    data.update(extra)
    return data


def listing(*seats: dict[str, Any]) -> SeatsList:
    return SeatsList(
        seats=[CustomerSeat.model_validate(s) for s in seats],
        total_seats=len(seats) + 2,
        available_seats=2,
    )


async def apply(
    sessions: Sessions, scope_id: str, seats: SeatsList, **options: Any
) -> ReconcileResult:
    return await reconcile(sessions, seats, scope_id=scope_id, **options)


async def test_rows_an_earlier_writer_stored_are_recognised_as_unchanged(
    sessions: Sessions,
) -> None:
    # What seat-sync's ORM path wrote before: every value through the models' own types.
    scope_id = "sub-orm"
    seats = listing(*(polar_seat(scope_id, n) for n in range(5)))
    synced = T0 + timedelta(days=1)
    async with sessions() as session, session.begin():
        await session.execute(
            insert(Seat), [{**seat_row(s), "synced_at": synced} for s in seats.seats]
        )
    result = await apply(sessions, scope_id, seats)
    assert (result.inserted, result.updated, result.unchanged, result.written) == (0, 0, 5, 0)
    assert {s.synced_at for s in (await seats_by_id(sessions)).values()} == {synced}
    assert await changes(sessions) == []


async def test_the_same_instant_in_another_offset_is_not_a_change(sessions: Sessions) -> None:
    scope_id = "sub-offset"
    first = polar_seat(scope_id, 1)
    await apply(sessions, scope_id, listing(first))
    plus_two = timezone(timedelta(hours=2))
    respelled = {
        **first,
        "claimed_at": (T0 + timedelta(hours=1)).astimezone(plus_two).isoformat(),
        "modified_at": datetime.fromisoformat(first["modified_at"])
        .astimezone(plus_two)
        .isoformat(),
    }
    again = await apply(sessions, scope_id, listing(respelled))
    assert again.written == 0
    stored = (await seats_by_id(sessions))[first["id"]]
    assert stored.claimed_at == T0 + timedelta(hours=1)
    assert stored.claimed_at is not None and stored.claimed_at.utcoffset() == timedelta(0)


async def test_metadata_with_keys_in_another_order_is_not_a_change(sessions: Sessions) -> None:
    scope_id = "sub-meta"
    seat = polar_seat(scope_id, 1, seat_metadata={"team": "a", "level": 3})
    await apply(sessions, scope_id, listing(seat))
    again = await apply(
        sessions, scope_id, listing({**seat, "seat_metadata": {"level": 3, "team": "a"}})
    )
    assert again.written == 0


async def test_absent_and_empty_metadata_are_stored_as_before(sessions: Sessions) -> None:
    scope_id = "sub-nometa"
    none, empty = (
        polar_seat(scope_id, 1, seat_metadata=None),
        polar_seat(scope_id, 2, seat_metadata={}),
    )
    await apply(sessions, scope_id, listing(none, empty))
    stored = await seats_by_id(sessions)
    assert stored[none["id"]].seat_metadata is None
    assert stored[empty["id"]].seat_metadata == {}
    assert (await apply(sessions, scope_id, listing(none, empty))).written == 0
    changed = await apply(sessions, scope_id, listing({**none, "seat_metadata": {}}, empty))
    assert (changed.updated, changed.changes) == (1, [])  # metadata alone: no history row


async def test_values_repeated_across_a_list_are_stored_each_as_its_own_seat_says(
    sessions: Sessions,
) -> None:
    # Equal values convert once per list; values that are equal in Python but not in JSON
    # (1 and True, 0.0 and -0.0), or the same instant in other offsets, must not share.
    scope_id = "sub-repeat"
    later = T0 + timedelta(hours=3)
    seats = [
        polar_seat(scope_id, 1, seat_metadata={"flag": 1}, modified_at=later.isoformat()),
        polar_seat(
            scope_id, 2, seat_metadata={"flag": True}, modified_at="2026-11-01T17:00:00+02:00"
        ),
        polar_seat(scope_id, 3, seat_metadata={"flag": 0.0}),
        polar_seat(scope_id, 4, seat_metadata={"flag": -0.0}),
        polar_seat(scope_id, 5, seat_metadata={"flag": 1}),
        polar_seat(scope_id, 6, seat_metadata={"flag": {"nested": [1]}}),
    ]
    await apply(sessions, scope_id, listing(*seats))
    stored = await seats_by_id(sessions)
    flags = [stored[s["id"]].seat_metadata["flag"] for s in seats]
    assert [(type(f), f) for f in flags] == [
        (int, 1),
        (bool, True),
        (float, 0.0),
        (float, -0.0),
        (int, 1),
        (dict, {"nested": [1]}),
    ]
    assert str(flags[3]) == "-0.0"
    assert {stored[s["id"]].modified_at for s in seats[:2]} == {later}
    assert (await apply(sessions, scope_id, listing(*seats))).written == 0
    # One seat of many sharing a value changes: only it is written.
    changed = [seats[0], {**seats[4], "seat_metadata": {"flag": 2}}, *seats[1:4], seats[5]]
    result = await apply(sessions, scope_id, listing(*changed))
    assert (result.updated, result.unchanged) == (1, 5)
    assert (await seats_by_id(sessions))[seats[4]["id"]].seat_metadata == {"flag": 2}


async def test_a_change_of_other_fields_only_updates_without_history(sessions: Sessions) -> None:
    scope_id = "sub-name"
    seat = polar_seat(scope_id, 1)
    await apply(sessions, scope_id, listing(seat))
    renamed = {**seat, "member": {**seat["member"], "name": "Renamed"}}
    result = await apply(sessions, scope_id, listing(renamed))
    assert (result.updated, result.changes) == (1, [])
    assert (await seats_by_id(sessions))[seat["id"]].member_name == "Renamed"
    assert [c.change for c in await changes(sessions, seat["id"])] == ["created"]


async def test_gone_and_returned_in_one_scope_record_what_the_mirror_held(
    sessions: Sessions,
) -> None:
    scope_id = "sub-gone"
    a, b, c = (polar_seat(scope_id, n) for n in range(3))
    await apply(sessions, scope_id, listing(a, b, c))
    gone = await apply(sessions, scope_id, listing(a))
    assert (gone.gone, gone.unchanged, gone.written) == (2, 1, 2)
    back = await apply(sessions, scope_id, listing(a, b))
    assert (back.updated, back.unchanged, back.gone) == (1, 1, 0)

    history = await changes(sessions, b["id"])
    assert [h.change for h in history] == ["created", "gone", "returned"]
    gone_row = history[1]
    assert (gone_row.old_status, gone_row.new_status) == ("claimed", "claimed")
    assert gone_row.old_email == gone_row.new_email == b["email"]
    assert gone_row.polar_modified_at == datetime.fromisoformat(b["modified_at"])
    stored = await seats_by_id(sessions)
    assert stored[b["id"]].gone_at is None and stored[c["id"]].gone_at is not None


async def test_a_seat_id_listed_under_a_second_container_moves_without_a_created_row(
    sessions: Sessions,
) -> None:
    # A Polar bug, but it must not crash us nor duplicate the row. Enough seats that the
    # new ones of the second scope are well past any one batch of ids.
    first, second = "sub-first", "sub-second"
    moving = polar_seat(first, 0)
    await apply(sessions, first, listing(moving, polar_seat(first, 1)))
    newcomers = [polar_seat(second, n) for n in range(2, 1202)]
    moved = {**moving, "subscription_id": second, "status": "pending", "claimed_at": None}
    result = await apply(sessions, second, listing(moved, *newcomers))

    assert (result.inserted, result.updated) == (1200, 1)
    stored = await seats_by_id(sessions)
    assert len(stored) == 1202
    assert stored[moving["id"]].subscription_id == second
    assert stored[moving["id"]].status == "pending"
    assert [(h.change, h.scope_id) for h in await changes(sessions, moving["id"])] == [
        ("created", first),
        ("status", second),
    ]
    # The first scope no longer lists it: it is now the second's, so not gone from there.
    again = await apply(sessions, first, listing(polar_seat(first, 1)))
    assert again.written == 0


async def test_order_scopes_reconcile_like_subscriptions(sessions: Sessions) -> None:
    order = "ord-1"
    seats = [polar_seat(order, n, kind="order") for n in range(3)]
    assert (await apply(sessions, order, listing(*seats), kind="order")).inserted == 3
    assert (await apply(sessions, order, listing(*seats[:2]), kind="order")).gone == 1
    assert {s.order_id for s in (await seats_by_id(sessions)).values()} == {order}


async def test_a_stale_fetch_leaves_the_scope_and_its_inbox_untouched(sessions: Sessions) -> None:
    scope_id = "sub-stale"
    seat = polar_seat(scope_id, 1)
    fresh = datetime.now(UTC)
    await apply(sessions, scope_id, listing(seat), fetch_started_at=fresh)
    received = fresh - timedelta(seconds=10)
    async with sessions() as session, session.begin():
        session.add(
            WebhookDelivery(
                webhook_id="wh-1",
                event_type="customer_seat.claimed",
                payload="{}",
                received_at=received,
            )
        )
        session.add(
            WebhookDeliveryScope(
                webhook_id="wh-1",
                scope_kind="subscription",
                scope_id=scope_id,
                received_at=received,
            )
        )
    async with sessions() as session:
        before = await session.get(SeatScope, ("subscription", scope_id))

    stale = await apply(
        sessions,
        scope_id,
        listing({**seat, "status": "revoked"}),
        fetch_started_at=fresh - timedelta(seconds=20),
    )
    assert stale.stale and stale.written == 0
    async with sessions() as session:
        after = await session.get(SeatScope, ("subscription", scope_id))
        open_scopes = (
            await session.execute(
                select(func.count())
                .select_from(WebhookDeliveryScope)
                .where(col(WebhookDeliveryScope.processed_at).is_(None))
            )
        ).scalar_one()
    assert before is not None and after is not None
    assert (after.last_synced_at, after.last_fetch_started_at) == (
        before.last_synced_at,
        before.last_fetch_started_at,
    )
    assert open_scopes == 1
    assert (await seats_by_id(sessions))[seat["id"]].status == "claimed"


async def test_a_fresh_fetch_answers_the_inbox_and_records_the_scope(sessions: Sessions) -> None:
    scope_id = "sub-inbox"
    received = datetime.now(UTC)
    async with sessions() as session, session.begin():
        session.add(
            WebhookDelivery(
                webhook_id="wh-2",
                event_type="customer_seat.assigned",
                payload="{}",
                received_at=received,
            )
        )
        session.add(
            WebhookDeliveryScope(
                webhook_id="wh-2",
                scope_kind="subscription",
                scope_id=scope_id,
                received_at=received,
            )
        )
    fetched = received + timedelta(milliseconds=5)
    await apply(sessions, scope_id, listing(polar_seat(scope_id, 1)), fetch_started_at=fetched)
    async with sessions() as session:
        delivery = await session.get(WebhookDelivery, "wh-2")
        scope = await session.get(SeatScope, ("subscription", scope_id))
    assert delivery is not None and delivery.outcome == "synced"
    assert scope is not None
    assert (scope.total_seats, scope.available_seats) == (3, 2)
    assert scope.last_fetch_started_at == fetched
    assert (scope.last_error, scope.consecutive_failures, scope.gone_at) == (None, 0, None)


async def test_a_naive_timestamp_is_refused(sessions: Sessions) -> None:
    seat = polar_seat("sub-naive", 1, claimed_at="2026-11-01T13:00:00")
    with pytest.raises(ValueError, match="naive"):
        await apply(sessions, "sub-naive", listing(seat))
    assert await seats_by_id(sessions) == {}
