"""The Procfile under honcho: release migrates, then web and worker come up as separate
processes, and a signed webhook sent to them is mirrored."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from sqlalchemy import select
from sqlmodel import col

from tests.support.commands import environment
from tests.support.ports import free_port
from tests.support.settings import SIM_TOKEN, WEBHOOK_SECRET
from tests.support.waiting import until_answering
from worker.models import Seat
from worker.platform.db import create_engine, session_factory
from worker.simulator.server import SimulatedPolar

ROOT = Path(__file__).resolve().parent.parent
HONCHO = str(Path(sys.executable).with_name("honcho"))


async def test_honcho_runs_web_and_worker_and_mirrors_a_webhook(
    sim: SimulatedPolar, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = environment(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        POLAR_API_URL=sim.base_url,
        POLAR_ACCESS_TOKEN=SIM_TOKEN,
        POLAR_WEBHOOK_SECRET=WEBHOOK_SECRET,
        LOG_FORMAT="json",
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )
    release = await asyncio.create_subprocess_exec(
        HONCHO,
        "-f",
        str(ROOT / "Procfile"),
        "start",
        "release",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(release.wait(), 60) == 0
    log_path = tmp_path / "honcho.log"
    with log_path.open("wb") as log_file:
        honcho = await asyncio.create_subprocess_exec(
            HONCHO,
            "-f",
            str(ROOT / "Procfile"),
            "start",
            "-p",
            str(port),
            "web",
            "worker",
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            await until_answering(
                f"{base}/readyz",
                within=30,
                what=lambda: "web ready:\n" + log_path.read_text(),
                every=0.1,
            )
            sim.webhooks.configure(url=f"{base}/webhooks/polar", secret=WEBHOOK_SECRET)
            sub = sim.state.create_subscription(seats=2)
            seat = sim.state.assign(subscription_id=sub["id"], email="honcho@example.com")
            await sim.webhooks.flush()
            engine = create_engine(database_url)
            try:
                for _ in range(200):
                    async with session_factory(engine)() as session:
                        found = (
                            await session.execute(select(Seat).where(col(Seat.id) == seat["id"]))
                        ).scalar_one_or_none()
                    if found is not None:
                        break
                    await asyncio.sleep(0.1)
            finally:
                await engine.dispose()
            assert found is not None, log_path.read_text()
            assert found.email == "honcho@example.com"
        finally:
            os.killpg(honcho.pid, signal.SIGTERM)
            await asyncio.wait_for(honcho.wait(), 30)
    output = log_path.read_text()
    assert "worker_started" in output and "webhook_accepted" in output
