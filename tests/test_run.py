"""`seat-sync run` on the embedded defaults: no DATABASE_URL, no REDIS_URL, one command.

An endpoint secret of either generation works end to end: the simulated Polar signs as
Polar does for that endpoint, the receiver verifies, the mirror shows the seat.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from tests.support.commands import SEAT_SYNC, environment, seat_sync
from tests.support.ports import free_port
from tests.support.settings import SIM_TOKEN
from tests.support.waiting import until_answering
from worker.simulator.server import SimulatedPolar
from worker.simulator.webhooks import SecretKind, new_webhook_secret


async def seats_json(env: dict[str, str], cwd: Path) -> list[dict[str, object]]:
    ran = await seat_sync("seats", "--format", "json", env=env, cwd=cwd)
    assert ran.code == 0, ran.err
    rows: list[dict[str, object]] = json.loads(ran.out)
    return rows


@pytest.mark.parametrize("secret_kind", ["standard", "legacy"])
async def test_run_mirrors_webhooks_on_embedded_defaults(
    sim: SimulatedPolar, tmp_path: Path, secret_kind: SecretKind
) -> None:
    secret = new_webhook_secret(secret_kind)
    port = free_port()
    env = environment(
        POLAR_API_URL=sim.base_url,
        POLAR_ACCESS_TOKEN=SIM_TOKEN,
        POLAR_WEBHOOK_SECRET=secret,
        LOG_FORMAT="json",
    )
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            SEAT_SYNC,
            "run",
            "--port",
            str(port),
            env=env,
            cwd=tmp_path,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await until_answering(
                f"http://127.0.0.1:{port}/readyz",
                within=20,
                what=lambda: "run ready:\n" + log_path.read_text(),
            )
            assert (tmp_path / "seat-sync.db").exists()  # the default SQLite file
            assert (tmp_path / ".seat-sync" / "redis.sock").exists()  # the private Redis

            sim.webhooks.configure(
                url=f"http://127.0.0.1:{port}/webhooks/polar", secret=secret, kind=secret_kind
            )
            sub = sim.state.create_subscription(seats=2)
            seat = sim.state.assign(subscription_id=sub["id"], email="run@example.com")
            await sim.webhooks.flush()
            started = time.monotonic()
            while time.monotonic() - started < 10:
                if any(r["id"] == seat["id"] for r in await seats_json(env, tmp_path)):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the seat never reached the mirror:\n" + log_path.read_text())
            sim.state.claim(seat["id"])
            await sim.webhooks.flush()
            while time.monotonic() - started < 20:
                rows = await seats_json(env, tmp_path)
                if [r["status"] for r in rows if r["id"] == seat["id"]] == ["claimed"]:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the claim never reached the mirror:\n" + log_path.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0, log_path.read_text()
    assert not (tmp_path / ".seat-sync" / "redis.sock").exists()  # its Redis stopped with it
    # Every delivery was verified and accepted on its first attempt (a 403 would be retried).
    assert sim.webhooks.attempts
    assert [a.status_code for a in sim.webhooks.attempts] == [202] * len(sim.webhooks.attempts)
