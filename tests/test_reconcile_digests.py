"""Reconcile compares each seat's digest (`seat.polar_digest`) before its row: an unchanged
resync writes nothing and keeps every digest; a row the guard trigger un-digested (a hand
edit) or stored before digests is compared in full, then repaired or only given its digest;
a real change in Polar is written with its history and a new digest; and a digest is the
same in every process and for every parse of the same list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
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
from worker.models import Seat
from worker.polar.schemas import SeatsList
from worker.resources import PolarResources
from worker.simulator.server import SimulatedPolar
from worker.simulator.state import SimState
from worker.sync.reconcile import _TEXT_FORM, _digest
from worker.sync.verify import verify_scope

Sessions = async_sessionmaker[AsyncSession]
REPO = Path(__file__).resolve().parent.parent


def listing(state: SimState, scope_id: str) -> SeatsList:
    """The subscription's seats as Polar lists them now (in a shuffled order)."""
    return SeatsList.model_validate(state.list_seats(subscription_id=scope_id))


async def mirrored_subscription(sessions: Sessions, seed: int) -> tuple[SimState, str, SeatsList]:
    """A subscription (`subscription`) mirrored from one listing: (Polar's state, the
    subscription's id, that listing)."""
    state = SimState(seed=seed)
    scope_id = subscription(state)
    seats = listing(state, scope_id)
    await reconcile(sessions, seats, scope_id=scope_id)
    return state, scope_id, seats


def without(seats: SeatsList, seat_id: str) -> SeatsList:
    return seats.model_copy(update={"seats": [s for s in seats.seats if s.id != seat_id]})


def polar_digests(seats: SeatsList) -> dict[str, bytes]:
    """The digest of each seat's values as Polar lists them."""
    return {seat.id: _digest(_TEXT_FORM.storage_row(seat)) for seat in seats.seats}


def seat_by_email(seats: SeatsList, email: str) -> str:
    [seat_id] = [s.id for s in seats.seats if s.email == email]
    return seat_id


async def stored_digests(sessions: Sessions) -> dict[str, bytes | None]:
    async with sessions() as session:
        rows = await session.execute(select(col(Seat.id), col(Seat.polar_digest)))
        return {seat_id: digest for seat_id, digest in rows}


async def edit_by_hand(engine: AsyncEngine, seat_id: str, **values: Any) -> None:
    """What anyone but seat-sync does: change columns, leave the digest alone."""
    async with engine.begin() as conn:
        await conn.execute(update(Seat).where(col(Seat.id) == seat_id).values(**values))


async def edit_behind_the_guard(engine: AsyncEngine, seat_id: str, **values: Any) -> None:
    """Change columns and leave the row's digest as it was, which the guard cannot see.

    One UPDATE that changes a column and writes the old digest back is caught (the digest
    is unchanged, so the trigger clears it); two are not: the first writes another digest
    with the edit (seat-sync's own kind of write), the second puts the old one back and
    changes no Polar column (e.g. a row restored from a copy)."""
    async with engine.begin() as conn:
        where = col(Seat.id) == seat_id
        old = (await conn.execute(select(col(Seat.polar_digest)).where(where))).scalar_one()
        assert old is not None, "the row must have a digest to hide an edit behind"
        await conn.execute(update(Seat).where(where).values(**values, polar_digest=b"\0" * 8))
        await conn.execute(update(Seat).where(where).values(polar_digest=old))


async def stored_metadata_text(engine: AsyncEngine, seat_id: str) -> str:
    async with engine.connect() as conn:
        stored = await conn.execute(
            text("SELECT CAST(seat_metadata AS TEXT) FROM seat WHERE id = :id"), {"id": seat_id}
        )
        return str(stored.scalar_one())


# ---------------------------------------------------------------------- unchanged lists


async def test_an_initial_load_stores_the_digest_of_every_seat(sessions: Sessions) -> None:
    state = SimState(seed=1)
    scope_id = subscription(state)
    seats = listing(state, scope_id)

    result = await reconcile(sessions, seats, scope_id=scope_id)

    assert result.inserted == len(EMAILS)
    stored = await stored_digests(sessions)
    assert stored == polar_digests(seats)
    assert {len(digest or b"") for digest in stored.values()} == {8}


async def test_an_unchanged_resync_writes_nothing_and_keeps_every_digest(
    sessions: Sessions,
) -> None:
    state = SimState(seed=2)
    scope_id = subscription(state)
    await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)
    rows_before = await row_states(sessions)
    history_before = len(await seat_changes(sessions))

    again = await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)

    assert (again.written, again.unchanged, again.changes) == (0, len(EMAILS), [])
    assert await row_states(sessions) == rows_before
    assert len(await seat_changes(sessions)) == history_before


# ---------------------------------------------------------------------- rows edited here


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("member_name", "Edited By Hand", id="member_name"),
        pytest.param("seat_metadata", {"team": "z"}, id="seat_metadata"),
        pytest.param("email", "someone.else@example.com", id="email"),
    ],
)
async def test_a_hand_edit_is_overwritten_by_the_next_sync_which_restores_the_digest(
    sessions: Sessions, engine: AsyncEngine, column: str, value: Any
) -> None:
    state, scope_id, seats = await mirrored_subscription(sessions, seed=3)
    seat_id = seat_by_email(seats, "bo@example.com")
    polar_value = getattr((await mirrored_seats(sessions))[seat_id], column)

    await edit_by_hand(engine, seat_id, **{column: value})
    edited = (await mirrored_seats(sessions))[seat_id]
    assert (getattr(edited, column), edited.polar_digest) == (value, None), "guard trigger"

    repair = await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)

    assert (repair.updated, repair.unchanged) == (1, len(EMAILS) - 1)
    repaired = (await mirrored_seats(sessions))[seat_id]
    assert getattr(repaired, column) == polar_value
    assert repaired.polar_digest == polar_digests(seats)[seat_id]
    after = await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)
    assert (after.written, after.unchanged) == (0, len(EMAILS))


# The repair writes the row with the digest of Polar's values, which is the digest the
# row already held (the edit hid behind it): the guard trigger sees Polar columns change
# under an unchanged digest and clears it. The next sync compares the row in full and
# records its digest, so the cost is one full comparison, but the repair's own write
# should leave the digest in place.
REPAIRED_WITHOUT_DIGEST = (
    "repaired row left without its digest: reconcile_scope's update wrote the digest the row "
    "already held, and seat_polar_digest_guard (migration 0004) cleared it because Polar "
    "columns changed under an unchanged digest"
)


async def test_a_row_changed_behind_the_guard_is_trusted_by_a_normal_sync(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    # Documented: a digest that still matches is believed; `verify --repair` is the way out.
    state, scope_id, seats = await mirrored_subscription(sessions, seed=4)
    seat_id = seat_by_email(seats, "ann@example.com")
    await edit_behind_the_guard(engine, seat_id, member_name="Hidden Edit")

    result = await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)

    assert (result.written, result.unchanged) == (0, len(EMAILS))
    kept = (await mirrored_seats(sessions))[seat_id]
    assert (kept.member_name, kept.polar_digest) == ("Hidden Edit", polar_digests(seats)[seat_id])


async def test_a_sync_that_does_not_trust_digests_repairs_a_row_changed_behind_the_guard(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    state, scope_id, seats = await mirrored_subscription(sessions, seed=5)
    seat_id = seat_by_email(seats, "ann@example.com")
    await edit_behind_the_guard(engine, seat_id, member_name="Hidden Edit", email="x@example.com")
    history_before = len(await seat_changes(sessions))

    result = await reconcile(
        sessions, listing(state, scope_id), scope_id=scope_id, trust_digests=False
    )

    assert (result.updated, result.unchanged) == (1, len(EMAILS) - 1)
    repaired = (await mirrored_seats(sessions))[seat_id]
    assert (repaired.member_name, repaired.email) == (None, "ann@example.com")
    # The e-mail the mirror held differs from Polar's: the repair records who holds it.
    holder = (await seat_changes(sessions))[history_before:]
    assert [(h.change, h.old_email, h.new_email) for h in holder] == [
        ("holder", "x@example.com", "ann@example.com")
    ]
    assert repaired.polar_digest == polar_digests(seats)[seat_id], REPAIRED_WITHOUT_DIGEST


async def test_verify_repair_mends_a_row_changed_behind_the_guard(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    scope_id = subscription(sim.state)
    seats = listing(sim.state, scope_id)
    await reconcile(services.sessions, seats, scope_id=scope_id)
    seat_id = seat_by_email(seats, "cy@example.com")
    await edit_behind_the_guard(services.engine, seat_id, member_name="Hidden Edit")

    report = await verify_scope(services, "subscription", scope_id, repair=True)

    assert [(d.seat_id, d.what) for d in report.differences] == [(seat_id, "field")]
    assert report.differences[0].detail.startswith("member_name:")
    assert report.repaired
    repaired = (await mirrored_seats(services.sessions))[seat_id]
    assert repaired.member_name is None
    clean = await verify_scope(services, "subscription", scope_id, repair=False)
    assert clean.differences == []
    assert repaired.polar_digest == polar_digests(seats)[seat_id], REPAIRED_WITHOUT_DIGEST


# ---------------------------------------------------------------------- rows without digests


async def test_rows_stored_without_a_digest_get_one_and_nothing_else_is_written(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    state, scope_id, seats = await mirrored_subscription(sessions, seed=6)
    async with engine.begin() as conn:  # as the migration left every row
        await conn.execute(
            update(Seat).where(col(Seat.subscription_id) == scope_id).values(polar_digest=None)
        )
    synced_before = {k: v.synced_at for k, v in (await mirrored_seats(sessions)).items()}
    history_before = len(await seat_changes(sessions))

    recorded = await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)

    assert (recorded.written, recorded.unchanged) == (0, len(EMAILS))
    assert await stored_digests(sessions) == polar_digests(seats)
    assert {k: v.synced_at for k, v in (await mirrored_seats(sessions)).items()} == synced_before
    assert len(await seat_changes(sessions)) == history_before
    after = await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)
    assert (after.written, after.unchanged) == (0, len(EMAILS))
    assert await stored_digests(sessions) == polar_digests(seats)


async def test_metadata_stored_in_another_key_order_is_kept_and_only_its_digest_recorded(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    # PostgreSQL's json (and SQLite's text) keep the text as written: an earlier writer's
    # key order is the same value, so it is neither rewritten nor recorded as a change.
    state, scope_id, seats = await mirrored_subscription(sessions, seed=7)
    seat_id = seat_by_email(seats, "bo@example.com")
    await edit_by_hand(engine, seat_id, seat_metadata={"number": 1, "team": "a"}, polar_digest=None)
    respelled = await stored_metadata_text(engine, seat_id)
    assert respelled.index('"number"') < respelled.index('"team"')
    history_before = len(await seat_changes(sessions))

    result = await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)

    assert (result.written, result.unchanged) == (0, len(EMAILS))
    assert await stored_metadata_text(engine, seat_id) == respelled
    assert (await stored_digests(sessions))[seat_id] == polar_digests(seats)[seat_id]
    assert len(await seat_changes(sessions)) == history_before


# ---------------------------------------------------------------------- changes in Polar


async def test_a_claim_in_polar_is_written_with_a_status_row_and_a_new_digest(
    sessions: Sessions,
) -> None:
    state = SimState(seed=8)
    scope_id = subscription(state)
    await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)
    seat_id = seat_by_email(listing(state, scope_id), "bo@example.com")
    old_digest = (await stored_digests(sessions))[seat_id]
    state.claim(seat_id)
    claimed = listing(state, scope_id)

    result = await reconcile(sessions, claimed, scope_id=scope_id)

    assert (result.updated, result.unchanged) == (1, len(EMAILS) - 1)
    assert [(c.seat_id, c.change, c.old_status, c.new_status) for c in result.changes] == [
        (seat_id, "status", "pending", "claimed")
    ]
    assert (await mirrored_seats(sessions))[seat_id].status == "claimed"
    new_digest = (await stored_digests(sessions))[seat_id]
    assert new_digest == polar_digests(claimed)[seat_id] != old_digest


async def test_a_revoke_in_polar_is_written_with_the_old_holder_and_a_new_digest(
    sessions: Sessions,
) -> None:
    state = SimState(seed=9)
    scope_id = subscription(state)
    await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)
    seat_id = seat_by_email(listing(state, scope_id), "cy@example.com")
    state.revoke(seat_id)
    revoked = listing(state, scope_id)

    result = await reconcile(sessions, revoked, scope_id=scope_id)

    assert result.updated == 1
    change = (await seat_changes(sessions, seat_id))[-1]
    assert (change.change, change.old_status, change.new_status) == ("status", "pending", "revoked")
    assert (change.old_email, change.new_email) == ("cy@example.com", None)
    stored = (await mirrored_seats(sessions))[seat_id]
    assert (stored.status, stored.email) == ("revoked", None)
    assert stored.polar_digest == polar_digests(revoked)[seat_id]


async def test_a_renamed_member_is_written_without_history_and_with_a_new_digest(
    sessions: Sessions,
) -> None:
    state, scope_id, seats = await mirrored_subscription(sessions, seed=10)
    seat_id = seat_by_email(seats, "ann@example.com")
    raw = state.list_seats(subscription_id=scope_id)
    for seat in raw["seats"]:
        if seat["id"] == seat_id:
            seat["member"]["name"] = "Ann Renamed"
    renamed = SeatsList.model_validate(raw)

    result = await reconcile(sessions, renamed, scope_id=scope_id)

    assert (result.updated, result.unchanged, result.changes) == (1, len(EMAILS) - 1, [])
    stored = (await mirrored_seats(sessions))[seat_id]
    assert stored.member_name == "Ann Renamed"
    assert stored.polar_digest == polar_digests(renamed)[seat_id] != polar_digests(seats)[seat_id]
    assert [c.change for c in await seat_changes(sessions, seat_id)] == ["created"]


async def test_a_seat_that_left_the_list_is_marked_gone(sessions: Sessions) -> None:
    state, scope_id, seats = await mirrored_subscription(sessions, seed=11)
    seat_id = seat_by_email(seats, "bo@example.com")

    result = await reconcile(
        sessions, without(listing(state, scope_id), seat_id), scope_id=scope_id
    )

    assert (result.gone, result.unchanged) == (1, len(EMAILS) - 1)
    assert (await mirrored_seats(sessions))[seat_id].gone_at is not None
    gone = (await seat_changes(sessions, seat_id))[-1]
    assert (gone.change, gone.old_email) == ("gone", "bo@example.com")


async def test_a_seat_that_comes_back_unchanged_is_returned_although_its_digest_matches(
    sessions: Sessions,
) -> None:
    state, scope_id, seats = await mirrored_subscription(sessions, seed=12)
    seat_id = seat_by_email(seats, "bo@example.com")
    await reconcile(sessions, without(listing(state, scope_id), seat_id), scope_id=scope_id)
    assert (await stored_digests(sessions))[seat_id] == polar_digests(seats)[seat_id]

    back = await reconcile(sessions, listing(state, scope_id), scope_id=scope_id)

    assert (back.updated, back.unchanged) == (1, len(EMAILS) - 1)
    stored = (await mirrored_seats(sessions))[seat_id]
    assert (stored.gone_at, stored.polar_digest) == (None, polar_digests(seats)[seat_id])
    assert [c.change for c in await seat_changes(sessions, seat_id)] == [
        "created",
        "gone",
        "returned",
    ]


# ---------------------------------------------------------------------- the same everywhere

_DIGESTS_OF_A_LISTING = """
import json, sys
from worker.polar.schemas import SeatsList
from worker.sync.reconcile import _TEXT_FORM, _digest
seats = SeatsList.model_validate_json(sys.stdin.read())
print(json.dumps({s.id: _digest(_TEXT_FORM.storage_row(s)).hex() for s in seats.seats}))
"""


def digests_in_another_process(listing_json: str, hash_seed: str) -> dict[str, bytes]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    ran = subprocess.run(
        [sys.executable, "-c", _DIGESTS_OF_A_LISTING],
        input=listing_json,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=False,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    return {seat_id: bytes.fromhex(hex_) for seat_id, hex_ in json.loads(ran.stdout).items()}


@pytest.mark.parametrize("hash_seed", ["0", "4242"])
async def test_another_process_computes_the_digests_this_one_stored(
    sessions: Sessions, hash_seed: str
) -> None:
    state = SimState(seed=13)
    scope_id = subscription(state)
    listing_json = json.dumps(state.list_seats(subscription_id=scope_id))
    await reconcile(sessions, SeatsList.model_validate_json(listing_json), scope_id=scope_id)

    theirs = digests_in_another_process(listing_json, hash_seed)

    assert theirs == await stored_digests(sessions)


def test_two_parses_of_one_list_give_equal_digests() -> None:
    state = SimState(seed=14)
    scope_id = subscription(state)
    listing_json = json.dumps(state.list_seats(subscription_id=scope_id))

    from_text = polar_digests(SeatsList.model_validate_json(listing_json))
    from_objects = polar_digests(SeatsList.model_validate(json.loads(listing_json)))

    assert from_text == from_objects
    assert len(set(from_text.values())) == len(EMAILS)


def test_a_digest_depends_on_values_not_on_the_objects_holding_them() -> None:
    # Within a list, equal timestamps share one converted string; alone, a seat's do not.
    # marshal's later formats mark shared objects, so they would digest differently.
    shared = "".join(["2026-11-01 12:00:00", ".000000"])
    equal = "".join(["2026-11-01 12:00:", "00.000000"])
    assert shared == equal and shared is not equal

    assert _digest(("seat-1", shared, shared, None)) == _digest(("seat-1", shared, equal, None))
    assert _digest(("seat-1", shared, None)) != _digest(("seat-1", None, shared))
