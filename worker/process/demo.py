"""`seat-sync demo`: the whole pipeline on the embedded defaults against the simulated Polar.

Simulated Polar --signed webhooks--> receiver --inbox--> Redis queue --> worker --fetch-->
simulated Polar --reconcile--> SQLite; then the mirror is shown as a table.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from worker.config import Settings
from worker.intake.receiver import running
from worker.platform.migrate import upgrade
from worker.platform.redis import EmbeddedRedis
from worker.polar.schemas import CustomerSeat
from worker.query.mirror import reading
from worker.query.seats import SeatFilter, matching_seats, seat_changes
from worker.resources import Resources
from worker.schedule.jobs import build_worker
from worker.simulator.server import SimulatedPolar
from worker.simulator.webhooks import new_webhook_secret

DEMO_TOKEN = "polar_oat_simulated"
CONVERGE_WITHIN_S = 15.0


def _normalised(seat: dict[str, Any]) -> dict[str, Any]:
    return CustomerSeat.model_validate(seat).model_dump(mode="json")


def _fresh_database(data_dir: Path) -> str:
    """An empty data directory; the URL of the SQLite mirror in it."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    return f"sqlite:///{(data_dir / 'mirror.db').resolve()}"


@contextlib.asynccontextmanager
async def _private_redis(data_dir: Path) -> AsyncIterator[str]:
    redis = EmbeddedRedis(data_dir)
    try:
        yield await redis.start()
    finally:
        await redis.stop()


@contextlib.asynccontextmanager
async def _worker(settings: Settings, redis_url: str) -> AsyncIterator[None]:
    """The arq worker running in this event loop."""
    worker = build_worker(settings, redis_url, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()


class _Scenario:
    """Changes made in the simulated Polar, each followed until the mirror matches it."""

    def __init__(self, sim: SimulatedPolar, mirror: Resources, console: Console) -> None:
        self.sim = sim
        self.mirror = mirror
        self.console = console
        self.all_matched = True

    async def mirrored(self, scope_id: str) -> dict[str, dict[str, Any]]:
        async with self.mirror.sessions() as session:
            rows = await matching_seats(
                session, SeatFilter(subscription_id=scope_id, include_gone=True)
            )
        return {s["id"]: _normalised(s) for s in rows}

    async def step(self, title: str, action: Callable[[], Any], scope_id: str) -> None:
        action()
        await self.sim.webhooks.flush()
        listed = self.sim.state.list_seats(subscription_id=scope_id)["seats"]
        expected = {s["id"]: _normalised(s) for s in listed}
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < CONVERGE_WITHIN_S:
            if await self.mirrored(scope_id) == expected:
                self.console.print(
                    f"[green]✓[/] {title} [dim](mirrored in {loop.time() - started:.2f}s)[/]"
                )
                return
            await asyncio.sleep(0.05)
        self.all_matched = False
        self.console.print(
            f"[red]✗[/] {title}: the mirror did not match Polar within {CONVERGE_WITHIN_S:g} s"
        )

    async def play(self) -> str:
        """Assign, claim, revoke and reassign seats of one subscription; returns the id of
        the slot whose history is worth showing (alice's, reused for carol)."""
        state = self.sim.state
        sub_id = str(state.create_subscription(seats=3, customer_email="buyer@acme.example")["id"])
        self.console.print(
            f"Simulated Polar at {self.sim.base_url}; subscription {sub_id} with 3 seats"
        )
        seats: dict[str, dict[str, Any]] = {}

        def assign(who: str, **extra: Any) -> Callable[[], None]:
            def action() -> None:
                seats[who] = state.assign(
                    subscription_id=sub_id, email=f"{who}@acme.example", **extra
                )

            return action

        await self.step("assign a seat to alice", assign("alice"), sub_id)
        await self.step("assign a seat to bob", assign("bob"), sub_id)
        await self.step("bob claims his seat", lambda: state.claim(seats["bob"]["id"]), sub_id)
        await self.step(
            "alice's seat is revoked", lambda: state.revoke(seats["alice"]["id"]), sub_id
        )
        await self.step("carol is invited (Polar reuses alice's slot)", assign("carol"), sub_id)
        await self.step(
            "dave gets a seat claimed immediately", assign("dave", immediate_claim=True), sub_id
        )
        return str(seats["alice"]["id"])


def _minute(iso: str | None) -> str:
    return f"{datetime.fromisoformat(iso):%Y-%m-%d %H:%M}" if iso else ""


async def _show_mirror(console: Console, mirror: Resources, slot: str) -> None:
    """The seat table, and the history of one slot from seat_change."""
    async with mirror.sessions() as session:
        rows = await matching_seats(session, SeatFilter(include_gone=True))
        changes = await seat_changes(session, slot)
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
            s["id"][:8],
            s["status"],
            s["email"] or "",
            _minute(s["invitation_token_expires_at"]),
            _minute(s["claimed_at"]),
        )
    console.print(table)
    history = Table(
        "observed", "change", "status", "holder", title=f"History of slot {slot[:8]} (seat_change)"
    )
    for c in changes:
        history.add_row(
            f"{datetime.fromisoformat(c['observed_at']):%H:%M:%S}",
            c["change"],
            f"{c['old_status'] or '-'} → {c['new_status'] or '-'}",
            f"{c['old_email'] or '-'} → {c['new_email'] or '-'}",
        )
    console.print(history)


async def run_demo(data_dir: Path, console: Console) -> bool:
    """Run the scenario; True when the mirror matched Polar after every step. Each part
    (simulated Polar, private Redis, worker, receiver, mirror reader) is a context on one
    exit stack: they stop in reverse order however the scenario ends."""
    database_url = await asyncio.to_thread(_fresh_database, data_dir)
    # A webhook endpoint created today: a standard secret, signed with its decoded key.
    secret = new_webhook_secret("standard")
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            SimulatedPolar(token=DEMO_TOKEN, seed=7, webhook_secret=secret)
        )
        redis_url = await stack.enter_async_context(_private_redis(data_dir))
        settings = Settings(
            database_url=database_url,
            polar_access_token=DEMO_TOKEN,
            polar_api_url=sim.base_url,
            polar_webhook_secret=secret,
            data_dir=data_dir,
            sync_retry_base_seconds=0.2,
        )
        await asyncio.to_thread(upgrade, database_url)
        await stack.enter_async_context(_worker(settings, redis_url))
        webhook_url = await stack.enter_async_context(running(settings, redis_url=redis_url))
        sim.webhooks.configure(url=webhook_url)
        mirror = await stack.enter_async_context(reading(settings))

        scenario = _Scenario(sim, mirror, console)
        slot = await scenario.play()
        await _show_mirror(console, mirror, slot)
        calls = sim.log.count(method="GET", path_prefix="/v1/customer-seats")
        console.print(f"{calls} seat-list calls to Polar for 6 changes; database: {database_url}")
        console.print(
            f"Query it: DATABASE_URL={database_url} seat-sync seats --format json", highlight=False
        )
    return scenario.all_matched
