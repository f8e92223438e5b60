"""kill -9 in the middle of the work, restart: nothing half-written, nothing done twice,
everything converges. Real `seat-sync` processes; the kill lands at a known point because
the simulated Polar holds, hangs, or kills from inside its own handler.

Recovery after a worker dies relies on the inbox sweep (the dead job's arq in-progress key
outlives it by the longest job timeout); the sweep only re-requests deliveries older than
10 s, so tests age the inbox instead of waiting (`Database.age_inbox`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from arq.connections import create_pool
from sqlalchemy import select
from sqlmodel import col

from tests.support.netfaults import TcpProxy
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
from tests.support.settings import WEBHOOK_SECRET, make_settings
from tests.support.simulated import polar_from_the_past
from tests.support.waiting import eventually
from tests.support.workers import mirror_subscriptions, run_worker_until_idle
from worker import queue
from worker.config import Settings
from worker.intake.receiver import running
from worker.models import (
    InvitationReminder,
    InvitationRenewal,
    ResyncItem,
    Seat,
    SeatChange,
    SyncRun,
    WebhookDelivery,
    WebhookDeliveryScope,
)
from worker.queue import REMIND_GATE_KEY
from worker.simulator.server import SimulatedPolar
from worker.simulator.webhooks import envelope_bytes
from worker.sync.resync import LOCK_KEY

HOUR = 3600.0
SEATS_PATH = "/v1/customer-seats"


@pytest.fixture
async def past_sim() -> AsyncIterator[SimulatedPolar]:
    async with polar_from_the_past(seed=7) as polar:
        yield polar


def seat_lists(sim: SimulatedPolar) -> int:
    return sim.log.count(method="GET", path_prefix=SEATS_PATH)


# ---------------------------------------------------------------------- reconcile


async def test_a_worker_killed_during_a_fetch_loses_no_acknowledged_event(
    sim: SimulatedPolar, settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    await db.add_recent_full_pass()
    env = process_env(db.url, redis_url, sim)
    sub_id = sim.state.create_subscription(seats=4)["id"]
    async with running(settings, redis_url=redis_url) as url, fleet(tmp_path) as procs:
        sim.webhooks.configure(url=url, secret=WEBHOOK_SECRET)
        for n in range(3):
            sim.state.assign(subscription_id=sub_id, email=f"fetch{n}@example.com")
        await sim.webhooks.flush()
        hold = sim.hold_list_seats(60)
        worker = await procs.worker(env)
        await hold.wait_entered(30)
        await worker.kill()
        sim.release_hold()

        assert await mirror_differences(db, sim) != []  # the killed job wrote nothing
        open_scopes = (await integrity(db)).open_delivery_scopes
        assert open_scopes == await db.count(WebhookDeliveryScope) > 0  # none answered
        await db.age_inbox(60)
        await procs.worker(env)
        await eventually(lambda: converged(db, sim), within=30, what="mirror == Polar")

        report = await integrity(db)
        assert report.history_ok, report
        assert report.open_delivery_scopes == 0
        # The killed job's run stays 'running': nothing closes runs of dead workers.
        assert report.unfinished_scope_runs <= 1
        assert procs.problems() == []


async def test_a_worker_killed_inside_the_reconcile_transaction_leaves_nothing_half_written(
    sim: SimulatedPolar, settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    await db.add_recent_full_pass()
    env = process_env(db.url, redis_url, sim)
    size = 4000 if LONG else 2000
    sub_id = sim.state.create_subscription(seats=size + 1)["id"]
    for n in range(size):
        sim.state.assign(subscription_id=sub_id, email=f"huge{n}@example.com")
    sim.state.drain_outbox()  # only the last assign is delivered
    async with running(settings, redis_url=redis_url) as url, fleet(tmp_path) as procs:
        sim.webhooks.configure(url=url, secret=WEBHOOK_SECRET)
        sim.state.assign(subscription_id=sub_id, email="last@example.com")
        await sim.webhooks.flush()
        worker = await procs.worker(env)

        async def fetched_and_writing() -> bool:
            return (
                sim.log.count(method="GET", path_prefix=SEATS_PATH, status=200) == 1
                and await db.in_write_transaction()
            )

        await eventually(fetched_and_writing, within=60, every=0.002, what="reconcile started")
        await worker.kill()

        scope_seats = col(Seat.subscription_id) == sub_id
        assert await db.count(Seat, scope_seats) == 0, "the kill did not roll the reconcile back"
        assert await db.count(SeatChange, col(SeatChange.scope_id) == sub_id) == 0
        assert (
            await db.count(WebhookDeliveryScope, col(WebhookDeliveryScope.processed_at).is_(None))
            == 1
        )

        await db.age_inbox(60)
        await procs.worker(env)
        await eventually(lambda: converged(db, sim), within=60, what="mirror == Polar")
        assert await db.count(Seat, scope_seats) == size + 1
        report = await integrity(db)
        assert report.history_ok, report
        assert procs.problems() == []


# ---------------------------------------------------------------------- full resync


async def test_a_full_resync_killed_half_way_resumes_where_it_stopped(
    sim: SimulatedPolar, db: Database, redis_url: str, tmp_path: Path
) -> None:
    scopes = 80 if LONG else 30
    for n in range(scopes):
        sub = sim.state.create_subscription(seats=2)
        sim.state.assign(subscription_id=sub["id"], email=f"pass{n}@example.com")
    sim.set_latency(0.1, SEATS_PATH)
    env = process_env(db.url, redis_url, sim, resync_concurrency=2)
    done = col(ResyncItem.done_at).is_not(None)
    async with fleet(tmp_path) as procs:
        first = await procs.command(env, "resync", "--all").start()

        async def half_done() -> bool:
            return await db.count(ResyncItem, done) >= scopes // 2

        await eventually(half_done, within=60, every=0.02, what="half the pass done")
        await first.kill()
        await asyncio.sleep(0.5)  # fetches in flight at the kill finish (into the void)
        done_at_kill = await db.count(ResyncItem, done)
        assert 0 < done_at_kill < scopes
        assert (await integrity(db)).unfinished_full_runs == 1
        assert (await integrity(db)).history_ok

        # The dead process's pass lock expires (LOCK_TTL_MS); fast-forward that.
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.delete(LOCK_KEY)
        finally:
            await client.aclose()
        lists_before = seat_lists(sim)
        second = await procs.command(env, "resync", "--all").start()
        assert await second.wait(60) == 0, second.output()
        assert "(resumed)" in second.output()

    # Nothing fetched twice. A scope whose reconcile committed just before the kill, but
    # whose item was not yet marked done, is skipped (synced after the pass started).
    refetched = seat_lists(sim) - lists_before
    assert scopes - done_at_kill - 2 <= refetched <= scopes - done_at_kill
    assert await db.count(SyncRun, col(SyncRun.kind) == "full") == 1
    run = await db.scalar(select(SyncRun).where(col(SyncRun.kind) == "full"))
    assert (run.status, run.scopes_seen) == ("ok", scopes)
    assert await mirror_differences(db, sim) == []
    report = await integrity(db)
    assert report.history_ok, report
    assert procs.problems() == []


# ---------------------------------------------------------------------- reminders


async def remind_gate_open(redis_url: str) -> None:
    """Wait out the dead worker's reminder gate (REMIND_INTERVAL_MINUTES, here 3 s), so
    the restarted worker's startup run is the one that resumes."""
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def gone() -> bool:
            return not await client.exists(REMIND_GATE_KEY)

        await eventually(gone, within=10, what="reminder gate expired")
    finally:
        await client.aclose()


def kill_after(sim: SimulatedPolar, method: str, calls: int, kill: Callable[[], None]) -> list[int]:
    """Make Polar's `method` kill the worker right after it processed call number `calls`:
    Polar did it, the worker never heard back."""
    original = getattr(sim.state, method)
    seen = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        seen[0] += 1
        if seen[0] == calls:
            kill()
        return result

    setattr(sim.state, method, wrapped)
    return seen


async def test_a_worker_killed_mid_reminder_batch_resends_no_invitation_twice(
    past_sim: SimulatedPolar, database_url: str, db: Database, redis_url: str, tmp_path: Path
) -> None:
    state = past_sim.state
    sub_id = state.create_subscription(seats=12)["id"]
    state.advance(10 * HOUR)  # these invitations expire in 4 h: inside the 6 h window
    seats = [state.assign(subscription_id=sub_id, email=f"r{n}@example.com") for n in range(12)]
    state.advance(20 * HOUR)
    await mirror_subscriptions(make_settings(database_url, past_sim), redis_url, sub_id)
    await db.add_recent_full_pass()
    env = process_env(
        db.url, redis_url, past_sim, remind_interval_minutes=0.05, remind_spread_seconds=1.5
    )
    async with fleet(tmp_path) as procs:
        holder: list[Any] = []
        kill_after(past_sim, "resend", 5, lambda: holder[0].kill9())
        holder.append(await procs.worker(env))
        await holder[0].wait(60)  # killed by the fifth resend

        assert sum(state.resend_count(s["id"]) for s in seats) == 5
        setattr(state, "resend", type(state).resend.__get__(state))  # noqa: B010
        await remind_gate_open(redis_url)
        await procs.worker(env)

        async def all_reminded() -> bool:
            return await db.count(InvitationReminder) == len(seats)

        await eventually(all_reminded, within=30, what="every invitation reminded")
        await eventually(
            lambda: _count_sent(db, len(seats) - 1), within=30, what="the rest recorded sent"
        )
        assert procs.problems() == []

    assert [state.resend_count(s["id"]) for s in seats] == [1] * len(seats)
    async with db.sessions() as session:
        outcomes = sorted(
            r.outcome for r in (await session.execute(select(InvitationReminder))).scalars()
        )
    # The one Polar sent while the worker died stays 'sending' (then 'unknown'), never resent.
    assert outcomes == ["sending"] + ["sent"] * (len(seats) - 1)


async def _count_sent(db: Database, expected: int) -> bool:
    return await db.count(InvitationReminder, col(InvitationReminder.outcome) == "sent") >= expected


# ---------------------------------------------------------------------- renewal


@pytest.mark.parametrize("polar_assigned", [False, True], ids=["before-assign", "after-assign"])
async def test_a_worker_killed_between_revoke_and_assign_renews_exactly_once(
    past_sim: SimulatedPolar,
    database_url: str,
    db: Database,
    redis_url: str,
    tmp_path: Path,
    polar_assigned: bool,
) -> None:
    state = past_sim.state
    sub_id = state.create_subscription(seats=3)["id"]
    expired = state.assign(subscription_id=sub_id, email="late@example.com")
    state.advance(30 * HOUR)  # its invitation expired 6 h ago
    await mirror_subscriptions(make_settings(database_url, past_sim), redis_url, sub_id)
    await db.add_recent_full_pass()
    env = process_env(
        db.url, redis_url, past_sim, remind_interval_minutes=0.05, renew_expired_invitations=True
    )
    async with fleet(tmp_path) as procs:
        holder: list[Any] = []
        if polar_assigned:
            kill_after(past_sim, "assign", 1, lambda: holder[0].kill9())
        else:
            past_sim.add_fault(SEATS_PATH, "hang", method="POST", hang_seconds=60)
        holder.append(await procs.worker(env))
        if not polar_assigned:
            await eventually(
                _assign_in_flight(past_sim), within=30, what="assign in flight after revoke"
            )
            await holder[0].kill()
        else:
            await holder[0].wait(60)
        past_sim.clear_faults()
        setattr(state, "assign", type(state).assign.__get__(state))  # noqa: B010

        renewal = await db.scalar(select(InvitationRenewal))
        assert (renewal.state, renewal.seat_id) == ("revoked", expired["id"])
        if not polar_assigned:
            assert state.get_seat(expired["id"])["status"] == "revoked"

        await remind_gate_open(redis_url)
        await procs.worker(env)

        async def renewed() -> bool:
            row = await db.scalar(select(InvitationRenewal))
            return row is not None and row.state == "assigned"

        await eventually(renewed, within=30, what="renewal assigned")
        assert procs.problems() == []
        # Resumed either way, the renewal has the scope synced: no webhook reaches this
        # fleet, so only that sync can replace the expired invitation in the mirror.
        await eventually(lambda: converged(db, past_sim), within=8, what="mirror == Polar")

    mine = [s for s in state.seats.values() if s["email"] == "late@example.com"]
    assert [s["status"] for s in mine] == ["pending"]  # exactly one fresh invitation
    fresh = datetime.fromisoformat(mine[0]["invitation_token_expires_at"].replace("Z", "+00:00"))
    assert fresh > datetime.now(UTC)
    assigns = [
        e
        for e in state.events
        if e.type == "customer_seat.assigned" and e.data["email"] == "late@example.com"
    ]
    assert len(assigns) == 2  # the original invitation and one renewal
    assert await db.count(InvitationRenewal) == 1
    assert (await integrity(db)).history_ok
    refused = past_sim.log.count(method="POST", path_prefix=SEATS_PATH, status=400)
    assert refused == (1 if polar_assigned else 0)  # resumed as SeatAlreadyAssigned
    mirrored = await db.scalar(select(Seat).where(col(Seat.id) == mine[0]["id"]))
    assert (mirrored.status, mirrored.invitation_token_expires_at) == ("pending", fresh)


def _assign_in_flight(sim: SimulatedPolar) -> Callable[[], Any]:
    async def check() -> bool:
        return any(f.fired for f in sim.runtime.faults)

    return check


# ---------------------------------------------------------------------- the web process


def signed(body: bytes, webhook_id: str) -> dict[str, str]:
    """One delivery attempt as Polar signs it for an endpoint created today."""
    return polar_headers(WEBHOOK_SECRET, "standard", body, webhook_id=webhook_id)


async def test_a_web_process_killed_between_commit_and_answer_stores_the_delivery_once(
    sim: SimulatedPolar, db: Database, redis_url: str, tmp_path: Path
) -> None:
    await db.add_recent_full_pass()
    sub_id = sim.state.create_subscription(seats=2)["id"]
    sim.state.assign(subscription_id=sub_id, email="commit@example.com")
    [event] = [e for e in sim.state.drain_outbox() if e.type == "customer_seat.assigned"]
    body, webhook_id = envelope_bytes(event), f"msg_{uuid.uuid4().hex}"
    redis_db = redis_url.rsplit("/", 1)[1]
    proxy = TcpProxy("127.0.0.1", int(redis_url.split(":")[2].split("/")[0]))
    await proxy.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}/webhooks/polar"
    web_env = process_env(db.url, f"redis://127.0.0.1:{proxy.port}/{redis_db}", sim)
    try:
        async with fleet(tmp_path) as procs, httpx.AsyncClient(timeout=30) as client:
            web = await procs.web(web_env, port)
            proxy.pause()  # the enqueue after the commit stalls: the answer is not sent yet
            post = asyncio.create_task(
                client.post(url, content=body, headers=signed(body, webhook_id))
            )

            async def committed() -> bool:
                return await db.count(WebhookDelivery) == 1

            await eventually(committed, within=10, every=0.01, what="delivery committed")
            await web.kill()
            with pytest.raises(httpx.HTTPError):
                await post  # Polar saw no answer: it will deliver the same id again
            proxy.resume()

            await procs.web(web_env, port)
            again = await client.post(url, content=body, headers=signed(body, webhook_id))
            assert again.status_code == 200  # a duplicate: nothing new stored
            assert await db.count(WebhookDelivery) == 1
            assert await db.count(WebhookDeliveryScope) == 1

            # The dead process may have set the scope's queued flag (if its request reached
            # the stalled Redis before the kill) but never enqueued the job: a flag with no
            # job, older than ORPHAN_GRACE_S, is replaced by the next request. Age it past
            # the grace rather than wait for it.
            await age_queued_flag(redis_url, "subscription", sub_id, queue.ORPHAN_GRACE_S + 1)
            await db.age_inbox(60)
            await procs.worker(process_env(db.url, redis_url, sim))
            await eventually(lambda: converged(db, sim), within=30, what="mirror == Polar")
            assert procs.problems() == []
    finally:
        await proxy.close()
    delivery = await db.scalar(select(WebhookDelivery))
    assert (delivery.webhook_id, delivery.outcome) == (webhook_id, "synced")
    assert await db.count(Seat) == 1
    assert (await integrity(db)).history_ok


async def age_queued_flag(redis_url: str, kind: str, scope_id: str, seconds: int) -> None:
    """Make the scope's queued flag, if there is one, look `seconds` older (its TTL counts
    down from the set)."""
    client = aioredis.Redis.from_url(redis_url)
    key = queue.queued_key(kind, scope_id)
    try:
        ttl = await client.ttl(key)
        if ttl > seconds:
            await client.expire(key, ttl - seconds)
    finally:
        await client.aclose()


async def test_an_orphaned_queued_flag_does_not_block_the_scope(
    sim: SimulatedPolar, settings: Settings, db: Database, redis_url: str
) -> None:
    sub_id = sim.state.create_subscription(seats=2)["id"]
    client = await create_pool(queue.redis_settings(redis_url))
    try:
        # What a web process or sweeper killed inside `request_sync` ten seconds ago leaves
        # behind: a flag naming a job that never reached the queue.
        await client.set(
            queue.queued_key("subscription", sub_id),
            f"sync:subscription:{sub_id}:never-enqueued",
            nx=True,
            ex=queue.QUEUED_FLAG_TTL_S - 10,
        )
        async with running(settings, redis_url=redis_url) as url:
            sim.webhooks.configure(url=url, secret=WEBHOOK_SECRET)
            sim.state.assign(subscription_id=sub_id, email="orphan@example.com")
            await sim.webhooks.flush()
        await db.age_inbox(60)
        await client.enqueue_job(queue.SWEEP_INBOX, _queue_name=queue.QUEUE_NAME)
    finally:
        await client.aclose()
    await run_worker_until_idle(settings, redis_url)  # the sweep, then whatever it asked for
    assert await mirror_differences(db, sim) == []
    assert (await integrity(db)).open_deliveries == 0


async def test_a_delivery_whose_sync_never_reached_redis_is_synced_by_the_sweep(
    sim: SimulatedPolar, settings: Settings, db: Database, redis_url: str
) -> None:
    sub_id = sim.state.create_subscription(seats=2)["id"]
    sim.state.assign(subscription_id=sub_id, email="again@example.com")
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    # The web process that committed it died before handing the sync to Redis:
    async with running(settings, redis_url=dead_redis) as url:
        sim.webhooks.configure(url=url, secret=WEBHOOK_SECRET)
        await sim.webhooks.flush()
    async with running(settings, redis_url=redis_url) as url:
        sim.webhooks.configure(url=url)
        for webhook_id in list(sim.webhooks.deliveries):
            # Recognised as a redelivery and answered without new work...
            assert (await sim.webhooks.redeliver(webhook_id)).status_code == 200
    client = await create_pool(queue.redis_settings(redis_url))
    try:
        assert await client.zcard(queue.QUEUE_NAME) == 0
        await db.age_inbox(60)
        await client.enqueue_job(queue.SWEEP_INBOX, _queue_name=queue.QUEUE_NAME)
    finally:
        await client.aclose()
    await run_worker_until_idle(settings, redis_url)  # ...and the sweep recovers it
    assert await mirror_differences(db, sim) == []
    assert (await integrity(db)).open_deliveries == 0
