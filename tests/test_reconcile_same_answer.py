"""A resync that gets the very answer Polar gave last time (`seat_scope.list_digest`) writes
nothing and compares no seat, unless the stored seats are no longer what that answer wrote:
a hand edit (the guard trigger cleared its digest), a deleted row, a row added to the scope,
a row marked gone. Any other answer (another order of the same seats included) is compared
seat by seat as before, and `trust_digests=False` always is."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlmodel import col

from tests.support.reconcile import (
    EMAILS,
    mirrored_seats,
    reconcile,
    row_states,
    seat_changes,
    subscription,
)
from worker.models import Seat, SeatScope, utcnow
from worker.polar.schemas import SeatsList
from worker.simulator.state import SimState
from worker.sync import reconcile as reconcile_module

Sessions = async_sessionmaker[AsyncSession]


def answer_body(state: SimState, scope_id: str) -> bytes:
    """Polar's answer to the seat list call, as bytes (the simulator's order: shuffled)."""
    return json.dumps(state.list_seats(subscription_id=scope_id)).encode()


def reordered(body: bytes) -> bytes:
    listing = json.loads(body)
    listing["seats"] = list(reversed(listing["seats"]))
    return json.dumps(listing).encode()


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many lists reconcile converted (one entry per list, its length)."""
    seen: list[int] = []
    convert: Callable[..., Any] = reconcile_module._converted

    def counting(backend: Any, seats: Any) -> Any:
        seen.append(len(seats))
        return convert(backend, seats)

    monkeypatch.setattr(reconcile_module, "_converted", counting)
    return seen


async def stored_list_digest(sessions: Sessions, scope_id: str) -> bytes | None:
    async with sessions() as session:
        row = await session.execute(
            select(col(SeatScope.list_digest)).where(col(SeatScope.scope_id) == scope_id)
        )
        value = row.scalar_one()
        return None if value is None else bytes(value)


async def loaded(sessions: Sessions, state: SimState) -> tuple[str, bytes]:
    """A subscription mirrored from one answer; (its id, that answer)."""
    scope_id = subscription(state)
    body = answer_body(state, scope_id)
    first = await reconcile(sessions, SeatsList.from_body(body), scope_id=scope_id)
    assert first.inserted == len(EMAILS)
    return scope_id, body


async def test_the_same_answer_again_compares_no_seat_and_writes_nothing(
    sessions: Sessions, conversions: list[int]
) -> None:
    scope_id, body = await loaded(sessions, SimState(seed=21))
    digest = await stored_list_digest(sessions, scope_id)
    assert digest is not None and len(digest) == 40
    rows_before = await row_states(sessions)
    history_before = len(await seat_changes(sessions))
    conversions.clear()

    again = await reconcile(sessions, SeatsList.from_body(body), scope_id=scope_id)

    assert (again.written, again.unchanged, again.changes) == (0, len(EMAILS), [])
    assert conversions == []  # no seat converted, so none compared
    assert await row_states(sessions) == rows_before
    assert len(await seat_changes(sessions)) == history_before
    assert await stored_list_digest(sessions, scope_id) == digest


async def test_the_same_seats_in_another_order_are_compared_and_the_new_answer_recorded(
    sessions: Sessions, conversions: list[int]
) -> None:
    scope_id, body = await loaded(sessions, SimState(seed=22))
    conversions.clear()
    other = SeatsList.from_body(reordered(body))

    again = await reconcile(sessions, other, scope_id=scope_id)

    assert (again.written, again.unchanged) == (0, len(EMAILS))
    assert conversions == [len(EMAILS)]
    after = await stored_list_digest(sessions, scope_id)
    assert after is not None and after[:20] == other.body_digest


async def test_a_list_not_parsed_from_an_answer_is_compared_and_clears_the_digest(
    sessions: Sessions, conversions: list[int]
) -> None:
    scope_id, body = await loaded(sessions, SimState(seed=23))
    conversions.clear()

    again = await reconcile(sessions, SeatsList.model_validate_json(body), scope_id=scope_id)

    assert (again.written, conversions) == (0, [len(EMAILS)])
    assert await stored_list_digest(sessions, scope_id) is None


async def test_a_hand_edit_under_the_same_answer_is_repaired(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    scope_id, body = await loaded(sessions, SimState(seed=24))
    seats = SeatsList.from_body(body)
    [seat_id] = [s.id for s in seats.seats if s.email == "bo@example.com"]
    async with engine.begin() as conn:
        await conn.execute(update(Seat).where(col(Seat.id) == seat_id).values(member_name="Hand"))

    repair = await reconcile(sessions, SeatsList.from_body(body), scope_id=scope_id)

    assert (repair.updated, repair.unchanged) == (1, len(EMAILS) - 1)
    assert (await mirrored_seats(sessions))[seat_id].member_name is None
    after = await reconcile(sessions, SeatsList.from_body(body), scope_id=scope_id)
    assert (after.written, after.unchanged) == (0, len(EMAILS))


async def test_a_deleted_row_under_the_same_answer_is_inserted_again(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    scope_id, body = await loaded(sessions, SimState(seed=25))
    seat_id = SeatsList.from_body(body).seats[0].id
    async with engine.begin() as conn:
        await conn.execute(delete(Seat).where(col(Seat.id) == seat_id))

    repair = await reconcile(sessions, SeatsList.from_body(body), scope_id=scope_id)

    assert (repair.inserted, repair.unchanged) == (1, len(EMAILS) - 1)
    assert seat_id in await mirrored_seats(sessions)


async def test_a_row_added_to_the_scope_under_the_same_answer_is_marked_gone(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    scope_id, body = await loaded(sessions, SimState(seed=26))
    async with engine.begin() as conn:
        await conn.execute(
            insert(Seat).values(
                id="seat-added-by-hand",
                created_at=utcnow(),
                subscription_id=scope_id,
                status="pending",
                email="extra@example.com",
                synced_at=utcnow(),
            )
        )

    repair = await reconcile(sessions, SeatsList.from_body(body), scope_id=scope_id)

    assert (repair.gone, repair.unchanged) == (1, len(EMAILS))
    assert (await mirrored_seats(sessions))["seat-added-by-hand"].gone_at is not None


async def test_a_row_marked_gone_under_the_same_answer_returns(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    scope_id, body = await loaded(sessions, SimState(seed=27))
    seat_id = SeatsList.from_body(body).seats[-1].id
    async with engine.begin() as conn:
        await conn.execute(update(Seat).where(col(Seat.id) == seat_id).values(gone_at=utcnow()))

    repair = await reconcile(sessions, SeatsList.from_body(body), scope_id=scope_id)

    assert (repair.updated, [c.change for c in repair.changes]) == (1, ["returned"])
    assert (await mirrored_seats(sessions))[seat_id].gone_at is None


async def test_not_trusting_digests_compares_the_same_answer_seat_by_seat(
    sessions: Sessions, engine: AsyncEngine, conversions: list[int]
) -> None:
    scope_id, body = await loaded(sessions, SimState(seed=28))
    conversions.clear()

    again = await reconcile(
        sessions, SeatsList.from_body(body), scope_id=scope_id, trust_digests=False
    )

    assert (again.written, conversions) == (0, [len(EMAILS)])
    # ...and the answer stays recorded for the next trusting sync.
    assert (await stored_list_digest(sessions, scope_id) or b"")[:20] == (
        SeatsList.from_body(body).body_digest
    )


async def test_a_changed_answer_is_written_and_becomes_the_one_recorded(
    sessions: Sessions, conversions: list[int]
) -> None:
    state = SimState(seed=29)
    scope_id, body = await loaded(sessions, state)
    pending = [s for s in SeatsList.from_body(body).seats if s.status == "pending"]
    state.claim(random.Random(1).choice(pending).id)
    changed = answer_body(state, scope_id)

    result = await reconcile(sessions, SeatsList.from_body(changed), scope_id=scope_id)

    assert [c.change for c in result.changes] == ["status"]
    conversions.clear()
    again = await reconcile(sessions, SeatsList.from_body(changed), scope_id=scope_id)
    assert (again.written, conversions) == (0, [])
