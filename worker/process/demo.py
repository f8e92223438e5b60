"""`seat-sync demo`: the whole pipeline on the embedded defaults against the simulated Polar.

Simulated Polar --signed webhooks--> receiver --inbox--> Redis queue --> worker --fetch-->
simulated Polar --reconcile--> SQLite; then the mirror is shown as a table.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlmodel import col

from worker.config import Settings
from worker.models import Seat, SeatChange, seat_json
from worker.platform.db import create_engine, session_factory
from worker.platform.migrate import upgrade
from worker.platform.redis import EmbeddedRedis
from worker.polar.schemas import CustomerSeat
from worker.schedule.jobs import build_worker

DEMO_TOKEN = "polar_oat_simulated"


def _normalised(seat: dict[str, Any]) -> dict[str, Any]:
    return CustomerSeat.model_validate(seat).model_dump(mode="json")


async def run_demo(data_dir: Path, console: Console) -> bool:
    """Run the scenario; True when the mirror matched Polar after every step."""
    from worker.intake.receiver import running
    from worker.simulator.server import SimulatedPolar
    from worker.simulator.webhooks import new_webhook_secret

    def fresh_dir() -> Path:
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        return (data_dir / "mirror.db").resolve()

    database_url = f"sqlite:///{await asyncio.to_thread(fresh_dir)}"
    # A webhook endpoint created today: a standard secret, signed with its decoded key.
    secret = new_webhook_secret("standard")
    sim = SimulatedPolar(token=DEMO_TOKEN, seed=7, webhook_secret=secret)
    await sim.start()
    redis = EmbeddedRedis(data_dir)
    redis_url = await redis.start()
    settings = Settings(
        database_url=database_url,
        polar_access_token=DEMO_TOKEN,
        polar_api_url=sim.base_url,
        polar_webhook_secret=secret,
        data_dir=data_dir,
        sync_retry_base_seconds=0.2,
    )
    await asyncio.to_thread(upgrade, database_url)
    worker = build_worker(settings, redis_url, handle_signals=False)
    receiver = running(settings, redis_url=redis_url)
    webhook_url = await receiver.__aenter__()
    sim.webhooks.configure(url=webhook_url)
    tasks = [asyncio.create_task(worker.async_run())]
    engine = create_engine(database_url, read_only=True)
    sessions = session_factory(engine)
    all_matched = True

    async def mirrored(scope_id: str) -> dict[str, dict[str, Any]]:
        async with sessions() as session:
            rows = await session.execute(select(Seat).where(col(Seat.subscription_id) == scope_id))
            return {s.id: _normalised(seat_json(s)) for s in rows.scalars()}

    async def step(title: str, action: Callable[[], Any], scope_id: str) -> None:
        nonlocal all_matched
        action()
        await sim.webhooks.flush()
        expected = {
            s["id"]: _normalised(s) for s in sim.state.list_seats(subscription_id=scope_id)["seats"]
        }
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < 15:
            if await mirrored(scope_id) == expected:
                console.print(
                    f"[green]✓[/] {title} [dim](mirrored in {loop.time() - started:.2f}s)[/]"
                )
                return
            await asyncio.sleep(0.05)
        all_matched = False
        console.print(f"[red]✗[/] {title}: the mirror did not match Polar within 15 s")

    try:
        state = sim.state
        sub = state.create_subscription(seats=3, customer_email="buyer@acme.example")
        sub_id = str(sub["id"])
        console.print(f"Simulated Polar at {sim.base_url}; subscription {sub_id} with 3 seats")
        seats: dict[str, dict[str, Any]] = {}
        await step(
            "assign a seat to alice",
            lambda: seats.__setitem__(
                "alice", state.assign(subscription_id=sub_id, email="alice@acme.example")
            ),
            sub_id,
        )
        await step(
            "assign a seat to bob",
            lambda: seats.__setitem__(
                "bob", state.assign(subscription_id=sub_id, email="bob@acme.example")
            ),
            sub_id,
        )
        await step("bob claims his seat", lambda: state.claim(seats["bob"]["id"]), sub_id)
        await step("alice's seat is revoked", lambda: state.revoke(seats["alice"]["id"]), sub_id)
        await step(
            "carol is invited (Polar reuses alice's slot)",
            lambda: seats.__setitem__(
                "carol", state.assign(subscription_id=sub_id, email="carol@acme.example")
            ),
            sub_id,
        )
        await step(
            "dave gets a seat claimed immediately",
            lambda: state.assign(
                subscription_id=sub_id, email="dave@acme.example", immediate_claim=True
            ),
            sub_id,
        )

        async with sessions() as session:
            rows = (
                (await session.execute(select(Seat).order_by(col(Seat.created_at)))).scalars().all()
            )
            slot = seats["alice"]["id"]
            changes = (
                (
                    await session.execute(
                        select(SeatChange)
                        .where(col(SeatChange.seat_id) == slot)
                        .order_by(col(SeatChange.id))
                    )
                )
                .scalars()
                .all()
            )
        table = Table(
            "seat",
            "status",
            "email",
            "invitation expires",
            "claimed at",
            title="The mirror (seat table)",
        )
        for s in rows:
            table.add_row(
                s.id[:8],
                s.status,
                s.email or "",
                f"{s.invitation_token_expires_at:%Y-%m-%d %H:%M}"
                if s.invitation_token_expires_at
                else "",
                f"{s.claimed_at:%Y-%m-%d %H:%M}" if s.claimed_at else "",
            )
        console.print(table)
        history = Table(
            "observed",
            "change",
            "status",
            "holder",
            title=f"History of slot {slot[:8]} (seat_change)",
        )
        for c in changes:
            history.add_row(
                f"{c.observed_at:%H:%M:%S}",
                c.change,
                f"{c.old_status or '-'} → {c.new_status or '-'}",
                f"{c.old_email or '-'} → {c.new_email or '-'}",
            )
        console.print(history)
        calls = sim.log.count(method="GET", path_prefix="/v1/customer-seats")
        console.print(f"{calls} seat-list calls to Polar for 6 changes; database: {database_url}")
        console.print(
            f"Query it: DATABASE_URL={database_url} seat-sync seats --format json", highlight=False
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await worker.close()
        await receiver.__aexit__(None, None, None)
        await engine.dispose()
        await sim.stop()
        await redis.stop()
    return all_matched
