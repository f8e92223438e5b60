"""The questions people ask the mirror, one command each; and `verify` proving it right."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlmodel import col
from typer.testing import CliRunner

from tests.support.commands import (
    SEAT_SYNC,
    Ran,
    env_for,
    environment,
    forget_own_variables,
    seat_sync,
)
from tests.support.settings import SIM_TOKEN
from worker.models import Seat
from worker.platform.db import create_engine, session_factory, transaction
from worker.polar.schemas import CustomerSeat
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


# ---------------------------------------------------------------------- readable tables


async def at_100_columns(*args: str, env: dict[str, str]) -> Ran:
    """`seat-sync ARGS` on a terminal 100 columns wide."""
    proc = await asyncio.create_subprocess_exec(
        SEAT_SYNC,
        *args,
        env=environment(env, COLUMNS="100"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def test_the_seats_table_shows_what_people_read_first_uncut(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)
    ids = await populate(sim, env)

    ran = await at_100_columns("seats", "--subscription", ids["sub"], env=env)

    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    assert lines[1].split() == ["email", "status", "scope", "claimed", "expires", "seat"]
    assert all(len(line) <= 100 for line in lines)
    assert "…" not in ran.out
    soon = next(line for line in lines if line.startswith("soon@example.com"))
    assert soon.split()[1:3] == ["pending", "sub"] and ids["soon"][:8] in soon
    assert {"later@example.com", "newcomer@example.com"} <= {line.split()[0] for line in lines}


async def test_columns_picks_the_table_and_scripts_keep_every_key(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)
    ids = await populate(sim, env)
    picked = ("--columns", "id,member_email,invitation_token_expires_at")

    table = await seat_sync("seats", "--status", "pending", *picked, env=env)
    as_json = await seat_sync("seats", "--status", "pending", *picked, "--format", "json", env=env)
    as_csv = await seat_sync("seats", "--status", "pending", *picked, "--format", "csv", env=env)
    unknown = await seat_sync("seats", "--columns", "id,nope", env=env)

    assert table.out.splitlines()[1].split() == list(picked[1].split(","))
    assert ids["soon"] in table.out  # the whole id, as asked
    assert set(json.loads(as_json.out)[0]) == set(CustomerSeat.model_fields)
    assert "customer_email" in as_csv.out.splitlines()[0].split(",")
    assert unknown.code == 2 and "no column nope" in unknown.err


async def test_seats_by_email_without_the_member_model(database_url: str, redis_url: str) -> None:
    """Organisations without Polar's member model have no `email` on seats: the address is
    `customer_email`; --email finds it, case-insensitively, and the table shows it."""
    async with SimulatedPolar(token=SIM_TOKEN, seed=5, member_model=False) as sim:
        sub = sim.state.create_subscription(seats=2, customer_email="billing@acme.example")
        seat = sim.state.assign(subscription_id=sub["id"], email="Gus@Acme.example")
        env = env_for(database_url, sim, redis_url)
        assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0

        found = await seat_sync("seats", "--email", "gus@acme.EXAMPLE", "--format", "json", env=env)
        table = await at_100_columns("seats", "--email", "GUS@acme.example", env=env)

    [row] = json.loads(found.out)
    assert (row["id"], row["email"], row["customer_email"]) == (
        seat["id"],
        None,
        "Gus@Acme.example",
    )
    assert table.out.splitlines()[3].startswith("Gus@Acme.example")


async def test_a_seat_by_the_short_id_the_table_shows(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url)
    ids = await populate(sim, env)

    ran = await seat_sync("seat", ids["leaver"][:8], "--format", "json", env=env)

    assert ran.code == 0, ran.err
    assert json.loads(ran.out)["seat"]["id"] == ids["leaver"]


# ---------------------------------------------------------------------- read-only reads

READ_COMMANDS = [
    ["seats", "--format", "json"],
    ["seat", "00000000-0000-0000-0000-000000000000", "--format", "json"],
    ["scopes"],
    ["history", "--lost", "--since", "7d"],
    ["status"],
    ["changes", "--format", "json"],
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=[c[0] for c in READ_COMMANDS])
def test_read_commands_open_the_database_read_only(
    monkeypatch: pytest.MonkeyPatch, database_url: str, command: list[str], tmp_path: Path
) -> None:
    """Every connection a read command opens is read-only (SQLite: the standard library's
    sqlite3 in mode=ro; PostgreSQL: a read-only engine), and it runs no write."""
    import sqlite3

    import worker.platform.db
    from worker.cli.app import app

    opened: list[bool] = []
    statements: list[str] = []
    real_connect = sqlite3.connect
    real_engine = worker.platform.db.create_engine

    def connect(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(kwargs.get("uri", False) and str(database).endswith("?mode=ro"))
        conn = real_connect(database, *args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    def engine(url: str, *, read_only: bool = False, **kwargs: Any) -> Any:
        opened.append(read_only)
        created = real_engine(url, read_only=read_only, **kwargs)

        @event.listens_for(created.sync_engine, "before_cursor_execute")
        def _seen(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
            statements.append(statement)

        return created

    monkeypatch.setattr(sqlite3, "connect", connect)
    monkeypatch.setattr(worker.platform.db, "create_engine", engine)
    forget_own_variables(monkeypatch)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))

    result = CliRunner().invoke(app, command, env={"DATABASE_URL": database_url})

    assert result.exit_code in (0, 1), result.output  # `seat` of an unknown id exits 1
    assert opened and all(opened), opened
    verbs = {s.lstrip().split()[0].upper() for s in statements}
    assert verbs <= {"SELECT", "BEGIN", "COMMIT", "ROLLBACK"}, statements
