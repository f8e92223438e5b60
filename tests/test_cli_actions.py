"""Seat actions from the CLI, written through: `assign`, `revoke`, `resend` call the simulated
Polar, then the mirror shows the result when the command returns, with no worker running;
Polar's refusals are one line and exit 1."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from tests.support.commands import Ran, env_for, seat_sync
from worker.polar.budget import KEY_LOG
from worker.simulator.server import SimulatedPolar


def error_line(ran: Ran) -> str:
    """The one line of the failure (the JSON log lines of the work done before it aside)."""
    assert "Traceback" not in ran.err, ran.err
    lines = [line for line in ran.err.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1, ran.err
    assert lines[0].startswith("error: ")
    return lines[0]


async def mirrored(env: dict[str, str], **filters: str) -> list[dict[str, Any]]:
    args = [part for key, value in filters.items() for part in (f"--{key}", value)]
    ran = await seat_sync("seats", *args, "--include-gone", "--format", "json", env=env)
    assert ran.code == 0, ran.err
    rows: list[dict[str, Any]] = json.loads(ran.out)
    return rows


async def test_assign_shows_the_invitation_in_the_mirror_when_it_returns(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=2)
    env = env_for(database_url, sim, redis_url)

    ran = await seat_sync(
        "assign",
        "--subscription",
        sub["id"],
        "--email",
        "ann@example.com",
        "--metadata",
        '{"team": "blue"}',
        "--format",
        "json",
        env=env,
    )

    assert ran.code == 0, ran.err
    seat = json.loads(ran.out)["seat"]
    assert (seat["email"], seat["status"], seat["seat_metadata"]) == (
        "ann@example.com",
        "pending",
        {"team": "blue"},
    )
    [row] = await mirrored(env, subscription=sub["id"])
    assert row == seat
    [polar] = sim.state.list_seats(subscription_id=sub["id"])["seats"]
    assert polar["id"] == seat["id"]


async def test_assign_spends_from_the_shared_rate_budget(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    order = sim.state.create_order(seats=1)
    env = env_for(database_url, sim, redis_url)

    ran = await seat_sync("assign", "--order", order["id"], "--email", "bo@example.com", env=env)

    assert ran.code == 0, ran.err
    assert "assigned seat" in ran.out and "bo@example.com" in ran.out
    client = aioredis.Redis.from_url(redis_url)
    try:
        # The assignment and the re-sync's list call, in the fleet's budget log.
        assert await client.zcard(KEY_LOG) == 2
    finally:
        await client.aclose()


async def test_revoke_by_the_short_id_the_table_shows(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=2)
    seat = state.assign(subscription_id=sub["id"], email="cy@example.com")
    state.claim(seat["id"])
    env = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0

    ran = await seat_sync("revoke", seat["id"][:8], env=env)

    assert ran.code == 0, ran.err
    assert state.get_seat(seat["id"])["status"] == "revoked"
    [row] = await mirrored(env, subscription=sub["id"])
    assert (row["id"], row["status"], row["email"]) == (seat["id"], "revoked", None)
    history = json.loads((await seat_sync("seat", seat["id"], "--format", "json", env=env)).out)
    assert history["history"][-1]["old_email"] == "cy@example.com"
    assert history["history"][-1]["new_status"] == "revoked"


async def test_resend_emails_the_pending_invitation_again(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=1)
    seat = state.assign(subscription_id=sub["id"], email="di@example.com")
    env = env_for(database_url, sim, redis_url)

    ran = await seat_sync("resend", seat["id"], env=env)

    assert ran.code == 0, ran.err
    assert state.resend_count(seat["id"]) == 1
    [row] = await mirrored(env, subscription=sub["id"])
    assert (row["id"], row["status"]) == (seat["id"], "pending")


async def test_no_seat_available_is_one_line(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=1)
    sim.state.assign(subscription_id=sub["id"], email="first@example.com")
    env = env_for(database_url, sim, redis_url)

    ran = await seat_sync(
        "assign", "--subscription", sub["id"], "--email", "second@example.com", env=env
    )

    assert ran.code == 1
    line = error_line(ran)
    assert "no seat available" in line and "SeatNotAvailable" in line and sub["id"] in line


async def test_a_second_seat_for_the_same_person_is_one_line(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=3)
    sim.state.assign(subscription_id=sub["id"], email="same@example.com")
    env = env_for(database_url, sim, redis_url)

    ran = await seat_sync(
        "assign", "--subscription", sub["id"], "--email", "same@example.com", env=env
    )

    assert ran.code == 1
    line = error_line(ran)
    assert "same@example.com already has a seat" in line and "SeatAlreadyAssigned" in line


async def test_resending_a_claimed_seat_is_one_line(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = sim.state.assign(subscription_id=sub["id"], email="ed@example.com")
    sim.state.claim(seat["id"])
    env = env_for(database_url, sim, redis_url)

    ran = await seat_sync("resend", seat["id"], env=env)

    assert ran.code == 1
    assert "is not pending" in error_line(ran) and "SeatNotPending" in ran.err
    assert sim.state.resend_count(seat["id"]) == 0


async def test_unknown_seat_and_subscription_are_one_line(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)

    revoked = await seat_sync("revoke", "00000000-0000-4000-8000-000000000000", env=env)
    missing = "00000000-0000-4000-8000-0000000000aa"
    assigned = await seat_sync(
        "assign", "--subscription", missing, "--email", "x@example.com", env=env
    )

    assert revoked.code == assigned.code == 1
    assert "not found in Polar" in error_line(revoked)
    assert f"subscription {missing} not found in Polar" in error_line(assigned)


async def test_an_assign_polar_did_not_answer_is_not_repeated(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    """A 5xx may come after Polar acted: the assignment is not sent again (it would e-mail
    twice, or fail as already assigned); the scope is re-synced and the line says so."""
    sub = sim.state.create_subscription(seats=2)
    sim.add_fault("/v1/customer-seats", status=502, method="POST", times=None)
    env = env_for(database_url, sim, redis_url)

    ran = await seat_sync(
        "assign", "--subscription", sub["id"], "--email", "fay@example.com", env=env
    )

    assert ran.code == 1
    assert "may or may not have done it" in error_line(ran)
    assert sim.log.count(method="POST", path_prefix="/v1/customer-seats") == 1
    scopes = json.loads((await seat_sync("scopes", "--format", "json", env=env)).out)
    assert [s["scope_id"] for s in scopes] == [sub["id"]]  # re-synced all the same


async def test_bad_arguments_are_refused_before_calling_polar(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)

    both = await seat_sync("assign", "--subscription", "s", "--order", "o", "--email", "e", env=env)
    metadata = await seat_sync(
        "assign", "--subscription", "s", "--email", "e@example.com", "--metadata", "[1]", env=env
    )

    assert both.code == metadata.code == 2
    assert "exactly one of --subscription" in error_line(both)
    assert "--metadata must be a JSON object" in error_line(metadata)
    assert sim.log.count(path_prefix="/v1/customer-seats") == 0
