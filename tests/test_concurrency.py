"""Four worker processes and two web processes on one database and one Redis, under a
burst of signed webhooks (delayed, reordered, duplicated) plus racing duplicate POSTs; and
reminders run from several processes at once. Runs on SQLite (one file shared by every
process) and on PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import col

from tests.support.polar_signing import polar_headers
from tests.support.ports import free_port
from tests.support.processes import (
    LONG,
    Database,
    converged,
    fleet,
    integrity,
    mirror_differences,
    process_env,
)
from tests.support.settings import SIM_TOKEN, WEBHOOK_SECRET, make_settings
from tests.support.simulated import polar_from_the_past
from tests.support.waiting import eventually, until_syncs_done
from tests.support.workers import mirror_subscriptions
from worker.models import InvitationReminder, SyncRun, WebhookDelivery
from worker.simulator.server import SimulatedPolar
from worker.simulator.webhooks import DeliveryChaos, envelope_bytes

HOUR = 3600.0
SCOPES = 60 if LONG else 30
SEATS_PER_SCOPE = 16 if LONG else 8


@pytest.fixture
async def chaotic_sim() -> AsyncIterator[SimulatedPolar]:
    """Deliveries overlap (random delays), arrive out of order, and some twice."""
    chaos = DeliveryChaos(duplicate_probability=0.1, delay_range=(0.0, 0.5))
    # This test is about concurrent writers, not the rate budget (tests/test_budget.py): a
    # 429 would end a sync_run as failed and hide the database errors this test looks for.
    async with SimulatedPolar(
        token=SIM_TOKEN, seed=4242, webhook_chaos=chaos, rate_limit=100_000
    ) as polar:
        yield polar


class RoundRobin(httpx.AsyncBaseTransport):
    """Spread requests over the web processes, like a load balancer in front of them."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=100))
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(port=self.ports[self.sent % len(self.ports)])
        self.sent += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def burst(sim: SimulatedPolar, subs: list[str], rng: random.Random) -> None:
    """Assign every seat, claim most, revoke some, and reuse a revoked slot."""
    state = sim.state
    for wave in range(SEATS_PER_SCOPE):
        for sub_id in subs:
            seat = state.assign(subscription_id=sub_id, email=f"w{wave}-{sub_id[:8]}@example.com")
            roll = rng.random()
            if roll < 0.6:
                state.claim(seat["id"])
            elif roll < 0.75:
                state.revoke(seat["id"])
                state.assign(subscription_id=sub_id, email=f"again{wave}-{sub_id[:8]}@example.com")


async def test_four_workers_and_two_webs_under_a_burst_lose_nothing_and_duplicate_nothing(
    chaotic_sim: SimulatedPolar, db: Database, redis_url: str, tmp_path: Path
) -> None:
    sim = chaotic_sim
    await db.add_recent_full_pass()  # whatever converges, converges through webhooks
    subs = [sim.state.create_subscription(seats=SEATS_PER_SCOPE)["id"] for _ in range(SCOPES)]
    env = process_env(db.url, redis_url, sim)
    ports = [free_port(), free_port()]
    try:
        async with fleet(tmp_path) as procs, httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(
                *(procs.web(env, port) for port in ports), *(procs.worker(env) for _ in range(4))
            )
            sim.webhooks.configure(
                url=f"http://127.0.0.1:{ports[0]}/webhooks/polar", secret=WEBHOOK_SECRET
            )
            sim.webhooks._client = httpx.AsyncClient(  # Polar -> a load balancer -> both webs
                # Polar's 10 s answer deadline; waiting for a free connection is not part of it.
                transport=RoundRobin(ports),
                timeout=httpx.Timeout(10, pool=None),
            )
            burst(sim, subs, random.Random(7))
            # The same new delivery POSTed to both web processes at the same instant:
            seat_events = [e for e in sim.state.events if e.type.startswith("customer_seat.")]
            racing = [
                (f"msg_{uuid.uuid4().hex}", envelope_bytes(event))
                for event in random.Random(8).sample(seat_events, 30)
            ]

            async def race(webhook_id: str, body: bytes) -> list[int]:
                answers = await asyncio.gather(
                    *(
                        client.post(
                            f"http://127.0.0.1:{port}/webhooks/polar",
                            content=body,
                            headers=polar_headers(
                                WEBHOOK_SECRET, "standard", body, webhook_id=webhook_id
                            ),
                        )
                        for port in ports
                    )
                )
                return sorted(a.status_code for a in answers)

            raced = await asyncio.gather(*(race(i, b) for i, b in racing))
            await sim.webhooks.flush(120)

            await eventually(
                lambda: converged(db, sim),
                within=90,
                every=0.5,
                what="mirror == Polar, inbox empty",
            )
            # Quiet before stopping: a change that reached a receiver while its scope's
            # sync ran has a follow-up due up to SYNC_MAX_WAIT_SECONDS later, even once the
            # mirror is right; stopping the workers would cancel it, recorded as failed.
            await until_syncs_done(redis_url, within=60)
            problems = procs.problems()

        delivered_seat_events = sum(1 for d in sim.webhooks.deliveries.values() if "seat" in d.type)
        assert delivered_seat_events >= SCOPES * SEATS_PER_SCOPE
        assert raced == [[200, 202]] * len(racing)  # exactly one of the two stored it
        # Never an error answer (a 503 is what "database is locked" would become). Attempts
        # with no answer at all (a client timeout on a loaded CI box) are retried by Polar.
        answers = {a.status_code for a in sim.webhooks.attempts if a.status_code is not None}
        assert answers <= {200, 202}, (answers, problems[:5])
        assert all(d.delivered for d in sim.webhooks.deliveries.values())
        assert await db.count(WebhookDelivery) == len(sim.webhooks.deliveries) + len(racing)
        # The end state, with every process stopped.
        assert await mirror_differences(db, sim) == []
        report = await integrity(db)
        assert report.history_ok, report
        assert (report.open_deliveries, report.open_delivery_scopes) == (0, 0), report
        assert report.unfinished_scope_runs == 0, report
        assert await failed_runs(db) == []
        assert problems == []
    finally:
        await sim.webhooks.aclose()


async def failed_runs(db: Database) -> list[str]:
    """The scope and error of every sync run recorded as failed."""
    async with db.sessions() as session:
        runs = (
            await session.execute(select(SyncRun).where(col(SyncRun.status) == "failed"))
        ).scalars()
        return [f"{r.scope_kind}:{r.scope_id} job {r.job_id}: {r.error}" for r in runs]


@pytest.fixture
async def past_sim() -> AsyncIterator[SimulatedPolar]:
    async with polar_from_the_past(seed=11) as polar:
        yield polar


async def test_reminders_run_from_several_processes_at_once_resend_each_invitation_once(
    past_sim: SimulatedPolar, database_url: str, db: Database, redis_url: str, tmp_path: Path
) -> None:
    state = past_sim.state
    subs = [state.create_subscription(seats=10)["id"] for _ in range(3)]
    state.advance(10 * HOUR)  # invitations made now expire in 4 h: inside the 6 h window
    seats = [
        state.assign(subscription_id=sub_id, email=f"r{n}-{sub_id[:8]}@example.com")
        for sub_id in subs
        for n in range(10)
    ]
    state.advance(20 * HOUR)
    await mirror_subscriptions(make_settings(database_url, past_sim), redis_url, *subs)
    await db.add_recent_full_pass()
    past_sim.set_latency(0.03, "/resend")  # each batch takes a while: they overlap
    env = process_env(db.url, redis_url, past_sim, remind_spread_seconds=0)
    async with fleet(tmp_path) as procs:
        commands = [procs.command(env, "remind", name="remind") for _ in range(3)]
        await asyncio.gather(*(c.start() for c in commands))
        await procs.worker(env)  # its startup cron reminds too
        await procs.worker(env)
        assert [await c.wait(60) for c in commands] == [0, 0, 0]

        async def recorded() -> bool:
            sent = col(InvitationReminder.outcome) == "sent"
            return await db.count(InvitationReminder, sent) == len(seats)

        await eventually(recorded, within=30, what="every invitation reminded")
        problems = procs.problems()

    assert [state.resend_count(s["id"]) for s in seats] == [1] * len(seats)
    async with db.sessions() as session:
        rows = (await session.execute(select(InvitationReminder))).scalars().all()
    assert sorted(r.seat_id for r in rows) == sorted(s["id"] for s in seats)
    assert problems == []
