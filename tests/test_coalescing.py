"""End to end over loopback HTTP: the simulated Polar sends SIGNED webhooks to the receiver
under uvicorn, an arq worker syncs from the simulated API, and nothing is lost or wasted."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import create_pool
from sqlalchemy import func, select
from sqlmodel import col

from tests.support.mirror import inbox_counts, mirror_view, polar_view
from tests.support.workers import mirror_subscriptions
from worker import queue
from worker.config import Settings
from worker.intake.receiver import running
from worker.models import SyncRun, WebhookDelivery
from worker.platform.db import create_engine, session_factory
from worker.schedule.jobs import build_worker
from worker.simulator.server import SimulatedPolar

SEATS_PATH = "/v1/customer-seats"
# Database timestamps and the queue's millisecond scores, compared across clocks' rounding.
CLOCK_SLACK = timedelta(milliseconds=20)


# ---------------------------------------------------------------------- helpers


def secret_of(settings: Settings) -> str:
    return settings.require_webhook_secret().get_secret_value()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def receiver(settings: Settings, redis_url: str, sim: SimulatedPolar) -> AsyncIterator[str]:
    """The receiver on a free loopback port, with the simulator's webhooks pointed at it."""
    async with running(settings, redis_url=redis_url) as url:
        sim.webhooks.configure(url=url, secret=secret_of(settings))
        yield url
        await sim.webhooks.flush()


class BackgroundWorker:
    """An in-process arq worker running in the background until its queue is empty.

    Not arq's burst mode: that stops as soon as the queue is empty, even for an instant
    between a sync and the change the test makes next. Its cron jobs are off: what these
    tests prove must happen without any periodic resync or sweep, and the list-call
    counts must be exact.
    """

    def __init__(self, settings: Settings, redis_url: str, *, max_jobs: int = 10) -> None:
        # Polar answers held list calls late on purpose; do not time them out.
        patient = settings.model_copy(update={"polar_timeout_seconds": 60.0})
        self.redis_url = redis_url
        self.worker = build_worker(
            patient, redis_url, handle_signals=False, max_jobs=max_jobs, cron_jobs=False
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.worker.async_run())

    async def finish(self, within: float = 30.0) -> None:
        """Once every change was acknowledged: wait until no job waits or runs, then stop."""
        assert self.task is not None
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            async with asyncio.timeout(within):
                while await client.zcard(queue.QUEUE_NAME) or self.worker.job_counter:
                    if self.task.done():
                        self.task.result()  # the worker died: say why
                        pytest.fail("the worker stopped with jobs in its queue")
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            await self.worker.close()


async def run_worker_until_idle(settings: Settings, redis_url: str, max_jobs: int = 10) -> None:
    burst = BackgroundWorker(settings, redis_url, max_jobs=max_jobs)
    burst.start()
    await burst.finish()


def seat_lists(sim: SimulatedPolar) -> int:
    return sim.log.count(method="GET", path_prefix=SEATS_PATH)


def lists_per_subscription(sim: SimulatedPolar, subs: list[str]) -> dict[str, int]:
    return {
        sub_id: sim.log.count(
            method="GET", path_prefix=SEATS_PATH, query={"subscription_id": sub_id}
        )
        for sub_id in subs
    }


def all_acknowledged(sim: SimulatedPolar) -> bool:
    return all(d.delivered for d in sim.webhooks.deliveries.values())


async def wait_for(predicate: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------- behaviour


async def test_a_thousand_events_over_fifty_scopes_cost_at_most_two_lists_each(
    sim: SimulatedPolar, receiver: str, settings: Settings, redis_url: str
) -> None:
    subs = [sim.state.create_subscription(seats=10)["id"] for _ in range(50)]

    def five_assigned_and_claimed(wave: int) -> None:
        for sub_id in subs:
            for n in range(5):
                email = f"w{wave}-{n}-{sub_id}@example.com"
                seat = sim.state.assign(subscription_id=sub_id, email=email)
                sim.state.claim(seat["id"])

    five_assigned_and_claimed(1)  # 500 seat events: one sync job waits per scope
    await sim.webhooks.flush()

    # Every scope's first sync fetches, and is held in flight while 500 more events land.
    hold = sim.hold_list_seats(60)
    burst = BackgroundWorker(settings, redis_url, max_jobs=50)
    burst.start()
    await wait_for(lambda: hold.held == 50)
    five_assigned_and_claimed(2)
    await sim.webhooks.flush()
    sim.release_hold()
    await burst.finish()

    delivered = [a for a in sim.webhooks.attempts if a.ok]
    assert len([a for a in delivered if a.type.startswith("customer_seat.")]) == 1000
    assert all_acknowledged(sim)
    assert max(lists_per_subscription(sim, subs).values()) <= 2
    for sub_id in subs:
        assert await mirror_view(settings, sub_id) == polar_view(sim, sub_id)
    counts = await inbox_counts(settings)
    assert counts["open_deliveries"] == 0
    assert counts["open_scopes"] == 0
    assert counts["deliveries"] == len(sim.webhooks.deliveries)


async def test_a_change_during_an_in_flight_sync_is_mirrored_without_a_resync(
    sim: SimulatedPolar, receiver: str, settings: Settings, redis_url: str
) -> None:
    sub_id = sim.state.create_subscription(seats=3)["id"]
    seat = sim.state.assign(subscription_id=sub_id, email="ada@example.com")
    await sim.webhooks.flush()

    hold = sim.hold_list_seats(60, snapshot="before", container_id=sub_id)
    burst = BackgroundWorker(settings, redis_url)
    burst.start()
    await hold.wait_entered()  # the fetch started, and will answer "pending"
    sim.state.claim(seat["id"])
    await sim.webhooks.flush()
    sim.release_hold()
    await burst.finish()

    assert await mirror_view(settings, sub_id) == polar_view(sim, sub_id)
    assert ("claimed", "ada@example.com") in {
        (status, email) for _, status, email, _ in await mirror_view(settings, sub_id)
    }
    assert seat_lists(sim) == 2
    assert sim.log.count(path_prefix="/v1/subscriptions") == 0
    assert (await inbox_counts(settings))["open_scopes"] == 0


async def test_redis_down_at_receipt_is_acknowledged_then_mirrored_by_the_sweep(
    sim: SimulatedPolar, settings: Settings, redis_url: str
) -> None:
    dead_redis = f"redis://127.0.0.1:{closed_port()}/0"
    async with running(settings, redis_url=dead_redis) as url:
        sim.webhooks.configure(url=url, secret=secret_of(settings))
        sub_id = sim.state.create_subscription(seats=2)["id"]
        seat = sim.state.assign(subscription_id=sub_id, email="grace@example.com")
        sim.state.claim(seat["id"])
        await sim.webhooks.flush()
    assert {a.status_code for a in sim.webhooks.attempts} == {202}
    assert (await inbox_counts(settings))["open_scopes"] == 4

    # Redis is back: the worker's sweep (here with no minimum age) asks for the sync.
    redis = await create_pool(queue.redis_settings(redis_url))
    try:
        await redis.enqueue_job(queue.SWEEP_INBOX, min_age_seconds=0, _queue_name=queue.QUEUE_NAME)
    finally:
        await redis.aclose()
    await run_worker_until_idle(settings, redis_url)

    assert await mirror_view(settings, sub_id) == polar_view(sim, sub_id)
    assert {s for _, s, _, _ in await mirror_view(settings, sub_id)} == {"claimed"}
    counts = await inbox_counts(settings)
    assert (counts["open_scopes"], counts["open_deliveries"]) == (0, 0)
    assert seat_lists(sim) == 1


async def test_database_down_answers_503_and_polars_retry_lands_after_recovery(
    sim: SimulatedPolar, settings: Settings, redis_url: str
) -> None:
    unreachable = settings.model_copy(
        update={"database_url": f"postgresql://postgres@127.0.0.1:{closed_port()}/gone"}
    )
    sub_id = sim.state.create_subscription(seats=2)["id"]
    sim.state.assign(subscription_id=sub_id, email="alan@example.com")
    async with running(unreachable, redis_url=redis_url) as down_url:
        sim.webhooks.configure(url=down_url, secret=secret_of(settings))
        sim.webhooks.kick()
        await wait_for(lambda: len(sim.webhooks.attempts) >= 3)
        assert {a.status_code for a in sim.webhooks.attempts} == {503}
        async with running(settings, redis_url=redis_url) as up_url:
            sim.webhooks.configure(url=up_url)  # the database is back
            await sim.webhooks.flush()
    assert all_acknowledged(sim)
    await run_worker_until_idle(settings, redis_url)
    assert await mirror_view(settings, sub_id) == polar_view(sim, sub_id)
    assert (await inbox_counts(settings))["open_deliveries"] == 0


async def test_duplicate_deliveries_are_processed_once(
    sim: SimulatedPolar, receiver: str, settings: Settings, redis_url: str
) -> None:
    sub_id = sim.state.create_subscription(seats=2)["id"]
    sim.state.assign(subscription_id=sub_id, email="edsger@example.com")
    await sim.webhooks.flush()
    await run_worker_until_idle(settings, redis_url)
    lists_before = seat_lists(sim)
    deliveries_before = (await inbox_counts(settings))["deliveries"]

    for webhook_id in list(sim.webhooks.deliveries):
        attempt = await sim.webhooks.redeliver(webhook_id)
        assert attempt.status_code == 200
    await run_worker_until_idle(settings, redis_url)

    assert lists_before == 1
    assert seat_lists(sim) == lists_before
    assert (await inbox_counts(settings))["deliveries"] == deliveries_before
    assert deliveries_before == len(sim.webhooks.deliveries) >= 3


async def test_deliveries_signed_with_another_secret_are_rejected_and_stored_nowhere(
    sim: SimulatedPolar, receiver: str, settings: Settings
) -> None:
    sim.webhooks.configure(secret="whsec_" + "w" * 32)
    sim.webhooks.max_attempts = 2
    sim.state.create_subscription(seats=2)
    await sim.webhooks.flush()
    assert sim.webhooks.attempts
    assert {a.status_code for a in sim.webhooks.attempts} == {403}
    assert (await inbox_counts(settings))["deliveries"] == 0


async def test_deliveries_with_a_stale_timestamp_are_rejected_and_stored_nowhere(
    sim: SimulatedPolar, receiver: str, settings: Settings
) -> None:
    sim.webhooks.timestamp_clock = lambda: time.time() - 600
    sim.webhooks.max_attempts = 2
    sim.state.create_subscription(seats=2)
    await sim.webhooks.flush()
    assert sim.webhooks.attempts
    assert {a.status_code for a in sim.webhooks.attempts} == {403}
    assert (await inbox_counts(settings))["deliveries"] == 0


async def test_events_about_containers_without_seats_are_accepted_and_ignored(
    sim: SimulatedPolar, receiver: str, settings: Settings, redis_url: str
) -> None:
    sim.state.create_subscription(seats=None)
    await sim.webhooks.flush()
    await run_worker_until_idle(settings, redis_url)
    assert {a.status_code for a in sim.webhooks.attempts} == {202}
    counts = await inbox_counts(settings)
    assert counts["deliveries"] == counts["ignored"] == len(sim.webhooks.attempts) > 0
    assert seat_lists(sim) == 0
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.keys("seat-sync:queued:*") == []
    finally:
        await client.aclose()


# ---------------------------------------------------------------------- leading + trailing edges


def windowed(settings: Settings, *, quiet: float, max_wait: float) -> Settings:
    return settings.model_copy(
        update={"sync_quiet_seconds": quiet, "sync_max_wait_seconds": max_wait}
    )


@contextlib.asynccontextmanager
async def receiving(sim: SimulatedPolar, settings: Settings, redis_url: str) -> AsyncIterator[None]:
    """The receiver with these settings, the simulator's webhooks pointed at it."""
    async with running(settings, redis_url=redis_url) as url:
        sim.webhooks.configure(url=url, secret=secret_of(settings))
        yield
        await sim.webhooks.flush()


async def quiet_subscription(sim: SimulatedPolar, settings: Settings, redis_url: str) -> str:
    """A subscription with one seat, already mirrored, whose creation sent no webhook: no
    sync of it waits or runs and it had no change, so its scope is quiet."""
    sub_id = sim.state.create_subscription(seats=8)["id"]
    sim.state.assign(subscription_id=sub_id, email="first@example.com")
    sim.state.drain_outbox()
    await mirror_subscriptions(settings, redis_url, sub_id)
    sim.log.clear()
    return sub_id


async def acknowledged(sim: SimulatedPolar) -> list[str]:
    """Deliver the webhooks of the changes just made; their ids, all acknowledged."""
    before = len(sim.webhooks.attempts)
    await sim.webhooks.flush()
    sent = sim.webhooks.attempts[before:]
    assert sent and all(a.ok for a in sent)
    return [a.webhook_id for a in sent]


async def change(sim: SimulatedPolar, sub_id: str, n: int) -> list[str]:
    """One seat assigned in Polar; its webhooks, acknowledged."""
    sim.state.assign(subscription_id=sub_id, email=f"change{n}@example.com")
    return await acknowledged(sim)


async def churn(sim: SimulatedPolar, sub_id: str, n: int) -> list[str]:
    """A seat assigned, or every other time a pending one revoked (so the seats never run
    out); its webhooks, acknowledged."""
    pending = [
        seat["id"]
        for seat in sim.state.list_seats(subscription_id=sub_id)["seats"]
        if seat["status"] == "pending"
    ]
    if n % 2 and pending:
        sim.state.revoke(pending[-1])
        return await acknowledged(sim)
    return await change(sim, sub_id, n)


async def received_at(settings: Settings, webhook_ids: list[str]) -> datetime:
    """When the receiver got the last of these deliveries."""
    engine = create_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            query = select(func.max(col(WebhookDelivery.received_at))).where(
                col(WebhookDelivery.webhook_id).in_(webhook_ids)
            )
            value = await session.scalar(query)
            assert value is not None
            return value
    finally:
        await engine.dispose()


async def sync_starts(settings: Settings, sub_id: str) -> list[datetime]:
    """When each sync of the scope the queue ran started, in order."""
    engine = create_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            rows = await session.execute(
                select(col(SyncRun.started_at))
                .where(col(SyncRun.scope_id) == sub_id, col(SyncRun.job_id).is_not(None))
                .order_by(col(SyncRun.started_at))
            )
            return list(rows.scalars())
    finally:
        await engine.dispose()


async def queued_starts(redis_url: str) -> list[float]:
    """When each job in the queue may start (Unix seconds)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return [s / 1000 for _, s in await client.zrange(queue.QUEUE_NAME, 0, -1, withscores=True)]
    finally:
        await client.aclose()


async def test_a_lone_change_is_synced_at_once(
    sim: SimulatedPolar, settings: Settings, redis_url: str
) -> None:
    # A quiet period far longer than the test: were the sync deferred, it would show.
    patient = windowed(settings, quiet=60.0, max_wait=120.0)
    sub_id = await quiet_subscription(sim, patient, redis_url)
    async with receiving(sim, patient, redis_url):
        await change(sim, sub_id, 1)
        acknowledged = time.time()

    assert [start <= acknowledged for start in await queued_starts(redis_url)] == [True]
    await run_worker_until_idle(patient, redis_url)
    assert seat_lists(sim) == 1
    assert await mirror_view(patient, sub_id) == polar_view(sim, sub_id)
    assert (await inbox_counts(patient))["open_scopes"] == 0


async def test_changes_during_a_sync_share_one_follow_up_started_after_the_quiet_period(
    sim: SimulatedPolar, settings: Settings, redis_url: str
) -> None:
    window = windowed(settings, quiet=1.0, max_wait=60.0)
    sub_id = await quiet_subscription(sim, window, redis_url)
    async with receiving(sim, window, redis_url):
        hold = sim.hold_list_seats(60, snapshot="before", container_id=sub_id)
        await change(sim, sub_id, 1)
        burst = BackgroundWorker(window, redis_url)
        burst.start()
        await hold.wait_entered()  # the leading sync fetches
        last: list[str] = []
        for n in range(2, 7):
            last = await change(sim, sub_id, n)
        sim.release_hold()
        await burst.finish()

    assert seat_lists(sim) == 2
    lead, follow_up = await sync_starts(window, sub_id)
    last_change = await received_at(window, last)
    assert lead < last_change
    assert follow_up >= last_change + timedelta(seconds=1.0) - CLOCK_SLACK
    assert await mirror_view(window, sub_id) == polar_view(sim, sub_id)
    assert (await inbox_counts(window))["open_scopes"] == 0


async def test_a_change_during_the_follow_ups_fetch_gets_a_follow_up_of_its_own(
    sim: SimulatedPolar, settings: Settings, redis_url: str
) -> None:
    window = windowed(settings, quiet=0.5, max_wait=60.0)
    sub_id = await quiet_subscription(sim, window, redis_url)
    async with receiving(sim, window, redis_url):
        lead_fetch = sim.hold_list_seats(60, snapshot="before", container_id=sub_id)
        await change(sim, sub_id, 1)
        burst = BackgroundWorker(window, redis_url)
        burst.start()
        await lead_fetch.wait_entered()
        await change(sim, sub_id, 2)  # -> the follow-up, after the quiet period
        sim.release_hold()
        follow_up_fetch = sim.hold_list_seats(60, snapshot="before", container_id=sub_id)
        await follow_up_fetch.wait_entered(max_wait=20)
        during = await change(sim, sub_id, 3)  # lands while the follow-up fetches
        sim.release_hold()
        await burst.finish()

    # The follow-up read Polar before change 3, so change 3 got a sync of its own.
    assert seat_lists(sim) == 3
    lead, follow_up, last = await sync_starts(window, sub_id)
    change_3 = await received_at(window, during)
    assert lead < follow_up < change_3 <= last
    assert await mirror_view(window, sub_id) == polar_view(sim, sub_id)
    assert "change3@example.com" in {email for _, _, email, _ in await mirror_view(window, sub_id)}
    assert (await inbox_counts(window))["open_scopes"] == 0


async def test_a_burst_longer_than_the_max_wait_is_synced_during_it(
    sim: SimulatedPolar, settings: Settings, redis_url: str
) -> None:
    # Changes every ~0.2 s for ~5 s: the scope is never quiet for 1.5 s until the end.
    window = windowed(settings, quiet=1.5, max_wait=2.0)
    sub_id = await quiet_subscription(sim, window, redis_url)
    async with receiving(sim, window, redis_url):
        started = time.monotonic()
        last = await churn(sim, sub_id, 0)
        burst = BackgroundWorker(window, redis_url)
        burst.start()
        n = 0
        while time.monotonic() - started < 5.0:
            await asyncio.sleep(0.2)
            n += 1
            last = await churn(sim, sub_id, n)
        duration = time.monotonic() - started
        await burst.finish()

    starts = await sync_starts(window, sub_id)
    last_change = await received_at(window, last)
    # A follow-up ran while changes kept coming: it did not wait for the scope to be quiet.
    assert any(start < last_change for start in starts[1:])
    assert 3 <= seat_lists(sim) <= 1 + math.ceil(duration / 2.0)
    assert await mirror_view(window, sub_id) == polar_view(sim, sub_id)
    assert (await inbox_counts(window))["open_scopes"] == 0


async def test_a_redelivery_costs_no_list_call_while_its_sync_waits_runs_or_is_done(
    sim: SimulatedPolar, settings: Settings, redis_url: str
) -> None:
    window = windowed(settings, quiet=0.5, max_wait=60.0)
    sub_id = await quiet_subscription(sim, window, redis_url)

    async def redeliver(webhook_ids: list[str]) -> None:
        for webhook_id in webhook_ids:
            assert (await sim.webhooks.redeliver(webhook_id)).status_code == 200

    async with receiving(sim, window, redis_url):
        first = await change(sim, sub_id, 1)
        await redeliver(first)  # its sync waits in the queue
        hold = sim.hold_list_seats(60, snapshot="before", container_id=sub_id)
        burst = BackgroundWorker(window, redis_url)
        burst.start()
        await hold.wait_entered()
        await redeliver(first)  # its sync runs
        sim.release_hold()
        await burst.finish()
        await redeliver(first)  # its sync is done
        await run_worker_until_idle(window, redis_url)

    assert seat_lists(sim) == 1
    assert await queued_starts(redis_url) == []
    counts = await inbox_counts(window)
    assert (counts["deliveries"], counts["open_scopes"]) == (len(first), 0)
