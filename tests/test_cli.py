"""The `seat-sync` command as people and scripts run it: a real subprocess, real databases."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.settings import SIM_TOKEN
from worker.polar.schemas import CustomerSeat
from worker.simulator.server import SimulatedPolar

SEAT_SYNC = str(Path(sys.executable).with_name("seat-sync"))


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def seat_sync(*args: str, env: dict[str, str]) -> Ran:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("POLAR_", "DATABASE_", "REDIS_"))
    }
    full_env.update(env)
    full_env["COLUMNS"] = "200"
    proc = await asyncio.create_subprocess_exec(
        SEAT_SYNC,
        *args,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def env_for(database_url: str, sim: SimulatedPolar, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "POLAR_API_URL": sim.base_url,
        "POLAR_ACCESS_TOKEN": SIM_TOKEN,
        "REDIS_URL": redis_url,
        "LOG_FORMAT": "json",
        **extra,
    }


def normalised(seat: dict[str, Any]) -> dict[str, Any]:
    return CustomerSeat.model_validate(seat).model_dump(mode="json")


async def test_resync_mirrors_every_key_then_writes_nothing(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=3)
    a = state.assign(subscription_id=sub["id"], email="ann@example.com", metadata={"k": "v"})
    state.claim(a["id"])
    b = state.assign(subscription_id=sub["id"], email="bo@example.com")
    state.revoke(b["id"])
    env = env_for(database_url, sim, redis_url)

    first = await seat_sync("resync", "--subscription", sub["id"], env=env)
    assert first.code == 0, first.err
    assert "2 inserted, 0 updated, 0 unchanged" in first.out

    listed = await seat_sync("seats", "--subscription", sub["id"], "--format", "json", env=env)
    assert listed.code == 0, listed.err
    rows = json.loads(listed.out)
    expected = {s["id"]: s for s in state.list_seats(subscription_id=sub["id"])["seats"]}
    assert {r["id"]: normalised(r) for r in rows} == {k: normalised(v) for k, v in expected.items()}
    assert all(set(r) == set(CustomerSeat.model_fields) for r in rows)

    second = await seat_sync("resync", "--subscription", sub["id"], env=env)
    assert second.code == 0, second.err
    assert "0 inserted, 0 updated, 2 unchanged" in second.out
    assert "no changes" in second.out


async def test_seats_filters_and_formats(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=3)
    state.assign(subscription_id=sub["id"], email="Cy@Example.com")
    c = state.assign(subscription_id=sub["id"], email="di@example.com")
    state.claim(c["id"])
    env = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0

    pending = await seat_sync("seats", "--status", "pending", "--format", "ndjson", env=env)
    lines = [json.loads(line) for line in pending.out.splitlines()]
    assert [r["email"] for r in lines] == ["Cy@Example.com"]
    by_email = await seat_sync("seats", "--email", "cy@example.com", "--format", "csv", env=env)
    header, row = by_email.out.strip().splitlines()
    assert "member_email" in header.split(",") and "Cy@Example.com" in row
    table = await seat_sync("seats", env=env)
    assert table.code == 0 and "di@example.com" in table.out


async def test_resync_all_and_status(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    for _ in range(3):
        sub = sim.state.create_subscription(seats=2)
        sim.state.assign(subscription_id=sub["id"], email=f"x{sub['id'][:4]}@example.com")
    env = env_for(database_url, sim, redis_url)
    ran = await seat_sync("resync", "--all", env=env)
    assert ran.code == 0, ran.err
    assert "3 scopes, 3 synced" in ran.out
    status = await seat_sync("status", "--format", "json", env=env)
    report = json.loads(status.out)
    assert report["full_resyncs"][0]["status"] == "ok"
    assert report["full_resyncs"][0]["scopes"] == 3
    assert report["deliveries_pending"] == 0


async def test_remind_dry_run_lists_without_sending(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=2)
    state.advance(-20 * 3600)
    seat = state.assign(subscription_id=sub["id"], email="soon@example.com")
    state.advance(20 * 3600)
    env = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0
    ran = await seat_sync("remind", "--dry-run", env=env)
    assert ran.code == 0, ran.err
    assert seat["id"] in ran.out and "soon@example.com" in ran.out
    assert state.resend_count(seat["id"]) == 0
    sent = await seat_sync("remind", env=env)
    assert "sent" in sent.out and state.resend_count(seat["id"]) == 1


async def test_missing_database_says_how_to_create_it(tmp_path: Path) -> None:
    ran = await seat_sync("seats", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}"})
    assert ran.code == 1
    assert "seat-sync db upgrade" in ran.err
    assert len(ran.err.strip().splitlines()) <= 2


async def test_bad_setting_is_named_in_one_line(tmp_path: Path) -> None:
    ran = await seat_sync(
        "seats",
        env={"POLAR_REQUESTS_PER_MINUTE": "lots", "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"},
    )
    assert ran.code == 2
    assert "POLAR_REQUESTS_PER_MINUTE" in ran.err


async def test_insecure_api_url_is_refused(tmp_path: Path) -> None:
    ran = await seat_sync(
        "resync",
        "--subscription",
        "x",
        env={
            "POLAR_API_URL": "http://api.example.com",
            "POLAR_ACCESS_TOKEN": "t",
            "DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        },
    )
    assert ran.code == 2 and "POLAR_API_URL" in ran.err and "https" in ran.err


async def test_auth_failure_is_one_line_without_the_token(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=1)
    env = env_for(database_url, sim, redis_url, POLAR_ACCESS_TOKEN="polar_oat_secret_value_123")
    ran = await seat_sync("resync", "--subscription", sub["id"], env=env)
    assert ran.code == 1
    assert "POLAR_ACCESS_TOKEN" in ran.err
    assert "polar_oat_secret_value_123" not in ran.err + ran.out
