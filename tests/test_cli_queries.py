"""The questions people ask the mirror, one command each; and `verify` proving it right."""

from __future__ import annotations

import json

from sqlalchemy import update
from sqlmodel import col

from tests.support.commands import env_for, seat_sync
from worker.models import Seat
from worker.platform.db import create_engine, session_factory, transaction
from worker.simulator.server import SimulatedPolar

HOUR = 3600.0


async def populate(sim: SimulatedPolar, env: dict[str, str]) -> dict[str, str]:
    state = sim.state
    sub = state.create_subscription(seats=5)
    state.advance(-20 * HOUR)
    soon = state.assign(subscription_id=sub["id"], email="soon@example.com")  # expires in 4 h
    state.advance(20 * HOUR)
    later = state.assign(subscription_id=sub["id"], email="later@example.com")  # in 24 h
    leaver = state.assign(subscription_id=sub["id"], email="leaver@example.com")
    state.claim(leaver["id"])
    ran = await seat_sync("resync", "--subscription", sub["id"], env=env)
    assert ran.code == 0, ran.err
    state.revoke(leaver["id"])
    state.assign(subscription_id=sub["id"], email="newcomer@example.com")  # reuses the slot
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0
    return {"sub": sub["id"], "soon": soon["id"], "later": later["id"], "leaver": leaver["id"]}


async def test_pending_invitations_expiring_in_6h(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)
    ids = await populate(sim, env)
    as_json = await seat_sync("seats", "--expiring-within", "6h", "--format", "json", env=env)
    assert as_json.code == 0, as_json.err
    assert [r["id"] for r in json.loads(as_json.out)] == [ids["soon"]]
    table = await seat_sync("seats", "--expiring-within", "6h", env=env)
    assert "soon@example.com" in table.out and "later@example.com" not in table.out


async def test_who_lost_access_this_week(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)
    ids = await populate(sim, env)
    as_json = await seat_sync("history", "--lost", "--since", "7d", "--format", "json", env=env)
    assert as_json.code == 0, as_json.err
    [row] = json.loads(as_json.out)
    assert (row["email"], row["seat_id"], row["was"]) == (
        "leaver@example.com",
        ids["leaver"],
        "claimed",
    )
    assert row["replaced_by"] == "newcomer@example.com"
    table = await seat_sync("history", "--lost", "--since", "7d", env=env)
    assert "leaver@example.com" in table.out


async def test_history_of_a_person_and_of_a_seat(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)
    ids = await populate(sim, env)
    person = json.loads(
        (
            await seat_sync("history", "--email", "LEAVER@example.com", "--format", "json", env=env)
        ).out
    )
    assert [(r["seat_id"], r["status"]) for r in person] == [(ids["leaver"], "pending")]
    assert person[0]["started_at"] is not None and person[0]["ended_at"] is not None
    seat = json.loads((await seat_sync("seat", ids["leaver"], "--format", "json", env=env)).out)
    assert seat["seat"]["email"] == "newcomer@example.com"
    assert [h["change"] for h in seat["history"]] == ["created", "status"]
    assert seat["history"][-1]["old_email"] == "leaver@example.com"
    missing = await seat_sync("seat", "no-such-seat", env=env)
    assert missing.code == 1 and "no seat" in missing.err


async def test_scopes_lists_counts(sim: SimulatedPolar, database_url: str, redis_url: str) -> None:
    env = env_for(database_url, sim, redis_url)
    ids = await populate(sim, env)
    [scope] = json.loads((await seat_sync("scopes", "--format", "json", env=env)).out)
    assert (scope["scope_id"], scope["total_seats"], scope["pending"], scope["claimed"]) == (
        ids["sub"],
        5,
        3,
        0,
    )


async def test_verify_finds_drift_and_repairs_it(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)
    ids = await populate(sim, env)
    assert (await seat_sync("verify", env=env)).code == 0
    engine = create_engine(database_url)
    try:
        async with transaction(session_factory(engine)) as session:
            await session.execute(
                update(Seat).where(col(Seat.id) == ids["later"]).values(status="claimed")
            )
    finally:
        await engine.dispose()
    sim.state.claim(ids["soon"])  # a change whose webhook was lost
    drift = await seat_sync("verify", env=env)
    assert drift.code == 3, drift.err
    assert ids["later"] in drift.out and ids["soon"] in drift.out
    calls = sim.log.count(path_prefix="/v1/customer-seats")
    repaired = await seat_sync("verify", "--repair", env=env)
    assert repaired.code == 0, repaired.err
    assert sim.log.count(path_prefix="/v1/customer-seats") == calls + 1
    clean = await seat_sync("verify", "--scope", f"subscription:{ids['sub']}", env=env)
    assert clean.code == 0 and "0 with drift" in clean.out
