"""Convergence under chaos: random seat operations over several scopes while webhooks are
dropped, duplicated, delayed and reordered, and Polar's seat list answers 5xx, hangs,
cut connections and 429s. Two in-process workers sync concurrently through the real
receiver. After the storm and ONE full resync the mirror equals Polar exactly, no
acknowledged webhook is left open and `seat_change` holds no impossible transition.

`CHAOS_SEEDS=500` runs the long profile (default 20 seeds); `CHAOS_OPS` sets the number of
operations per storm. Each run prints its seed; a failing seed reproduces the same
operation sequence (the interleaving with the workers varies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.chaos_driver import (
    History,
    Mirror,
    Profile,
    SeatState,
    Storm,
    inbox_problems,
    mirror_differences,
    rung_after_last_change,
    seat_change_violations,
    wait_until_drained,
)
from tests.support.settings import SIM_TOKEN, make_settings, secret_of
from tests.support.waiting import eventually
from tests.support.workers import run_worker_until_idle, worker_resources
from worker.config import Settings
from worker.intake import inbox
from worker.intake.receiver import running
from worker.models import SeatChange, utcnow
from worker.polar.errors import Lane
from worker.polar.schemas import SeatsList
from worker.resources import WorkerResources
from worker.schedule.jobs import build_worker
from worker.simulator.server import SimulatedPolar
from worker.simulator.webhooks import DeliveryChaos
from worker.sync import resync
from worker.sync import scope as sync


def chaos_seeds(spec: str) -> list[int]:
    """`CHAOS_SEEDS`: a count ("500": seeds 0..499), a range ("100-199") or a list ("3,17")."""
    if "," in spec:
        return [int(part) for part in spec.split(",") if part.strip()]
    if "-" in spec:
        first, last = spec.split("-", 1)
        return list(range(int(first), int(last) + 1))
    return list(range(int(spec)))


SEEDS = chaos_seeds(os.environ.get("CHAOS_SEEDS", "20"))
PROFILE = Profile(ops=int(os.environ.get("CHAOS_OPS", "16")))


@contextlib.asynccontextmanager
async def workers(settings: Settings, redis_url: str, count: int = 2) -> AsyncIterator[None]:
    """`count` long-running arq workers (no cron: only webhooks drive syncs)."""
    started = [
        build_worker(
            settings, redis_url, burst=False, handle_signals=False, max_jobs=4, cron_jobs=False
        )
        for _ in range(count)
    ]
    tasks = [asyncio.create_task(w.async_run()) for w in started]
    try:
        # The storm starts once every worker is up (its startup checks the schema).
        await eventually(
            lambda: all("services" in w.ctx for w in started),
            within=20,
            every=0.005,
            what="every worker started",
        )
        yield
    finally:
        for worker, task in zip(started, tasks, strict=True):
            await worker.close()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    failed = sum(w.jobs_failed for w in started)
    assert failed == 0, f"{failed} jobs failed for good (retries exhausted or a crash)"


@dataclass
class Outcome:
    """A storm, what Polar really went through, and the mirror before the final resync."""

    storm: Storm
    history: History
    before_resync: dict[str, list[str]]
    owed: set[str]  # scopes that had to equal Polar before the resync
    seconds: float


async def run_storm(database_url: str, redis_url: str, seed: int, profile: Profile) -> Outcome:
    """The storm, then: faults off, webhooks flushed, queue drained, ONE full resync."""
    started = time.monotonic()
    sim = SimulatedPolar(
        token=SIM_TOKEN,
        seed=seed,
        webhook_chaos=DeliveryChaos(
            drop_probability=profile.drop,
            duplicate_probability=profile.duplicate,
            delay_range=(0.0, profile.delay),
            reorder=True,
        ),
    )
    await sim.start()
    settings = make_settings(
        database_url,
        sim,
        polar_timeout_seconds=0.3,  # a hung list call times out quickly
        sync_retry_base_seconds=0.05,
        sync_max_tries=12,
        sync_quiet_seconds=profile.quiet,
        sync_max_wait_seconds=profile.max_wait,
        resync_concurrency=2,
        polar_webhook_secret=sim.webhooks.secret,  # generated as Polar does today
    )
    storm = Storm(sim, seed, profile)
    history = History(sim)
    try:
        async with running(settings, redis_url=redis_url) as url:
            sim.webhooks.configure(url=url)
            async with workers(settings, redis_url):
                storm.create_scopes()
                storm.add_faults()
                await storm.run()
                storm.calm()
                await sim.webhooks.flush()
                await wait_until_drained(redis_url)
            before_mirror = await Mirror.load(database_url)
            before = mirror_differences(storm, before_mirror)
            owed = rung_after_last_change(history, before_mirror)
            async with worker_resources(settings, redis_url) as resources:
                summary = await resync.resync_all(resources, trigger="chaos", force=True)
            assert summary is not None
            assert summary.failed == 0, summary
    finally:
        await sim.stop()
    return Outcome(storm, history, before, owed, time.monotonic() - started)


def explain(storm: Storm) -> str:
    return f"seed={storm.seed} ops={storm.counts}\n" + "\n".join(storm.log)


@pytest.mark.parametrize("seed", SEEDS)
async def test_the_mirror_converges_after_a_storm(
    database_url: str, redis_url: str, seed: int
) -> None:
    print(f"chaos seed={seed} backend={database_url.split(':', 1)[0]}")
    outcome = await run_storm(database_url, redis_url, seed, PROFILE)
    storm = outcome.storm
    mirror = await Mirror.load(database_url)

    assert mirror_differences(storm, mirror) == {}, explain(storm)
    assert inbox_problems(storm, mirror) == [], explain(storm)
    assert seat_change_violations(mirror.changes, outcome.history, mirror.seats) == [], explain(
        storm
    )
    # Before the resync: a scope that got a webhook after its last change had already
    # converged (the receiver's promise); one whose last change rang no doorbell (the
    # webhook was dropped, or was about a member the mirror did not know) waits for it.
    stale = {k: v for k, v in outcome.before_resync.items() if k in outcome.owed}
    waiting = {k: v for k, v in outcome.before_resync.items() if k not in outcome.owed}
    for scope_id, problems in waiting.items():
        print(f"before resync, {scope_id[:8]} waited for it (no webhook after): {problems}")
    assert stale == {}, explain(storm)
    print(
        f"chaos seed={seed} done in {outcome.seconds:.1f}s: {storm.counts} {storm.stats()} "
        f"healed by the resync: {len(waiting)} scopes"
    )


# ---------------------------------------------------------------------- regressions


def change(
    row_id: int, change_kind: str, old: SeatState | None, new: SeatState, seat_id: str = "s1"
) -> SeatChange:
    old = old or (None, None, None)
    return SeatChange(
        id=row_id,
        seat_id=seat_id,
        scope_kind="subscription",
        scope_id="sub",
        observed_at=utcnow(),
        change=change_kind,
        old_status=old[0],
        old_member_id=old[1],
        old_email=old[2],
        new_status=new[0],
        new_member_id=new[1],
        new_email=new[2],
    )


ADA_PENDING: SeatState = ("pending", "m-ada", "ada@example.com")
ADA_CLAIMED: SeatState = ("claimed", "m-ada", "ada@example.com")
BOB_PENDING: SeatState = ("pending", "m-bob", "bob@example.com")
REVOKED: SeatState = ("revoked", None, None)


def polar_history(*states: SeatState) -> History:
    return History.of({"s1": list(states)})


def test_the_seat_change_audit_accepts_a_real_history_with_missed_states() -> None:
    truth = polar_history(ADA_PENDING, ADA_CLAIMED, REVOKED, BOB_PENDING, REVOKED)
    rows = [
        change(1, "created", None, ADA_PENDING),
        # the claim and the revoke were missed: Ada's seat went to Bob
        change(2, "holder", ADA_PENDING, BOB_PENDING),
        change(3, "status", BOB_PENDING, REVOKED),
    ]
    assert seat_change_violations(rows, truth) == []


@pytest.mark.parametrize(
    ("rows", "broken"),
    [
        pytest.param(
            [
                change(1, "created", None, ADA_PENDING),
                change(2, "status", ADA_PENDING, ADA_CLAIMED),
                change(3, "status", ADA_CLAIMED, ADA_PENDING),
            ],
            "are not in Polar's order",
            id="an-older-snapshot-overwrote-a-newer-one",
        ),
        pytest.param(
            [
                change(1, "created", None, ADA_PENDING),
                change(2, "status", ADA_PENDING, ADA_CLAIMED),
                change(3, "status", ADA_PENDING, ADA_CLAIMED),
            ],
            "not the previous row's new state",
            id="the-same-change-recorded-twice",
        ),
        pytest.param(
            [change(1, "created", None, ADA_PENDING), change(2, "created", None, ADA_PENDING)],
            "created twice",
            id="created-twice",
        ),
        pytest.param(
            [change(1, "status", ADA_PENDING, ADA_CLAIMED)],
            "history starts with status",
            id="no-created-row",
        ),
        pytest.param(
            [change(1, "created", None, ("revoked", "m-ada", None))],
            "holder does not match the status",
            id="a-revoked-seat-with-a-holder",
        ),
        pytest.param(
            [change(1, "created", None, ("expired", "m-ada", "ada@example.com"))],
            "unknown status",
            id="an-unknown-status",
        ),
        pytest.param(
            [
                change(1, "created", None, ADA_PENDING),
                change(2, "returned", ADA_PENDING, ADA_PENDING),
            ],
            "returned without being gone",
            id="returned-without-gone",
        ),
        pytest.param(
            [
                change(1, "created", None, ADA_PENDING),
                change(2, "holder", ADA_PENDING, ADA_CLAIMED),
            ],
            "holder row must keep the status",
            id="a-holder-row-that-changes-the-status",
        ),
    ],
)
def test_the_seat_change_audit_rejects_impossible_histories(
    rows: list[SeatChange], broken: str
) -> None:
    truth = polar_history(ADA_PENDING, ADA_CLAIMED, REVOKED)
    assert any(broken in problem for problem in seat_change_violations(rows, truth))


async def test_an_older_snapshot_landing_last_never_moves_the_mirror_back(
    sim: SimulatedPolar,
    services: WorkerResources,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two syncs of one scope overlap (a job runs while its follow-up starts). The first
    takes its fetch timestamp, then waits for the shared rate budget; the second reads
    Polar at once but its answer is slow to come back. Meanwhile the invitee claims. The
    first fetch sees the claim and lands first; the second, older snapshot lands last.

    The mirror must not go back to "pending", and seat_change must not say Ada lost her
    claimed seat. (Found while writing the audit's rule 6: the freshness guard compares
    fetch start times, taken before the wait for the budget, not when Polar was read.)
    """
    history = History(sim)
    sub_id = sim.state.create_subscription(seats=2)["id"]
    seat = sim.state.assign(subscription_id=sub_id, email="ada@example.com")
    await sync.sync_scope(services, kind="subscription", scope_id=sub_id)

    budget, polar = services.budget, services.polar
    real_acquire, real_list = budget.acquire, polar.list_scope_seats
    first_may_call, second_read, second_may_answer = (
        asyncio.Event(),
        asyncio.Event(),
        asyncio.Event(),
    )
    calls = 0

    async def acquire(lane: Lane) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await first_may_call.wait()  # a budget wait, a slow connection ...
        await real_acquire(lane)

    async def list_scope_seats(*args: Any, **kwargs: Any) -> SeatsList:
        seats = await real_list(*args, **kwargs)
        if calls == 2 and not second_read.is_set():
            second_read.set()
            await second_may_answer.wait()  # ... and an answer slow to come back
        return seats

    monkeypatch.setattr(budget, "acquire", acquire)
    monkeypatch.setattr(polar, "list_scope_seats", list_scope_seats)

    first = asyncio.create_task(sync.sync_scope(services, kind="subscription", scope_id=sub_id))
    await eventually(lambda: calls == 1, within=5, every=0.005, what="the first sync's wait")
    second = asyncio.create_task(sync.sync_scope(services, kind="subscription", scope_id=sub_id))
    # (A sync that serialises fetches per scope makes the second wait for the first here.)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(second_read.wait(), 0.5)
    sim.state.claim(seat["id"])
    first_may_call.set()
    await first
    second_may_answer.set()
    await second

    mirror = await Mirror.load(settings.database_url)
    [row] = [s for s in mirror.seats if s.id == seat["id"]]
    assert row.status == "claimed"
    assert seat_change_violations(mirror.changes, history, mirror.seats) == []


async def change_during_first_sync(
    sim: SimulatedPolar,
    settings: Settings,
    redis_url: str,
    email: str,
    change: Callable[[dict[str, Any]], object],
) -> dict[str, Any]:
    """Assign a seat to `email` and deliver that webhook. While the first sync of its scope
    holds Polar's answer (read before the change), `change(seat)` happens in Polar and its
    webhooks are delivered; then every sync runs to the end. Returns the seat."""
    async with running(settings, redis_url=redis_url) as url:
        sim.webhooks.configure(url=url, secret=secret_of(settings))
        sub_id = sim.state.create_subscription(seats=2)["id"]
        seat = sim.state.assign(subscription_id=sub_id, email=email)
        await sim.webhooks.flush()
        hold = sim.hold_list_seats(30, snapshot="before", container_id=sub_id, times=1)
        worker = asyncio.create_task(run_worker_until_idle(settings, redis_url))
        await hold.wait_entered()
        change(seat)
        await sim.webhooks.flush()
        sim.release_hold()
        await worker
        await run_worker_until_idle(settings, redis_url)  # whatever the webhook asked for
    return seat


async def test_a_member_email_change_during_the_first_sync_of_their_seat_is_mirrored(
    sim: SimulatedPolar, settings: Settings, redis_url: str
) -> None:
    """Ada's seat is being synced for the first time (the fetch has read her old e-mail)
    when she changes her e-mail: Polar sends only `member.updated`. The receiver routes it
    by the mirror's seats, which do not show Ada yet. Without a resync the mirror must
    still end with her new e-mail. (Found while defining which scopes must have converged
    before the resync: a member event is routed only through what the mirror shows.)"""
    history = History(sim)
    seat = await change_during_first_sync(
        sim,
        settings,
        redis_url,
        "ada@example.com",
        lambda seat: sim.state.update_member_email(seat["member_id"], "ada.lovelace@example.com"),
    )

    mirror = await Mirror.load(settings.database_url)
    [row] = [s for s in mirror.seats if s.id == seat["id"]]
    assert row.email == "ada.lovelace@example.com"
    assert seat_change_violations(mirror.changes, history, mirror.seats) == []


async def test_a_customer_email_change_during_the_first_sync_of_their_seat_is_mirrored(
    database_url: str, redis_url: str
) -> None:
    """The same race without the member model: Lee's address is her seat's
    `customer_email`, and when her customer's e-mail changes Polar sends only
    `customer.updated`. It arrives while the first sync of her seat has read the old
    address: routed by the mirror's seats alone it would find nothing to sync."""
    async with SimulatedPolar(token=SIM_TOKEN, seed=21, member_model=False) as sim:
        settings = make_settings(database_url, sim, polar_webhook_secret=sim.webhooks.secret)
        seat = await change_during_first_sync(
            sim,
            settings,
            redis_url,
            "lee@example.com",
            lambda seat: sim.state.update_customer_email(
                seat["customer_id"], "lee.new@example.com"
            ),
        )

    mirror = await Mirror.load(settings.database_url)
    [row] = [s for s in mirror.seats if s.id == seat["id"]]
    assert (row.email, row.customer_email) == (None, "lee.new@example.com")


async def test_a_delivery_for_two_scopes_synced_at_once_is_closed(
    sim: SimulatedPolar, settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grace holds a seat in two subscriptions of one customer, so her `member.updated`
    asks two scopes to sync. Both syncs commit at the same moment: each marks its own
    scope answered and, before the other commits, still sees the other's open. The
    delivery must end processed all the same. (Found by the chaos storm on PostgreSQL,
    seeds 4 and 9, once member events were routed to several scopes.)"""
    subs = [
        sim.state.create_subscription(seats=2, customer_email="team@example.com")["id"]
        for _ in range(2)
    ]
    seats = [sim.state.assign(subscription_id=s, email="grace@example.com") for s in subs]
    async with running(settings, redis_url=redis_url) as url:
        sim.webhooks.configure(url=url, secret=secret_of(settings))
        async with worker_resources(settings, redis_url) as services:
            for sub_id in subs:
                await sync.sync_scope(services, kind="subscription", scope_id=sub_id)
            assert seats[0]["member_id"] == seats[1]["member_id"]
            sim.state.update_member_email(seats[0]["member_id"], "grace.hopper@example.com")
            await sim.webhooks.flush()

            # Hold each sync between its inbox update and its commit until the other got
            # there too (at most a second, so a sync that serialises them still finishes).
            both_marked = asyncio.Barrier(2)
            real_mark = inbox.mark_scope_synced

            async def mark_then_wait(*args: Any, **kwargs: Any) -> int:
                answered = await real_mark(*args, **kwargs)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(both_marked.wait(), 1.0)
                return answered

            monkeypatch.setattr(inbox, "mark_scope_synced", mark_then_wait)
            await asyncio.gather(
                *(sync.sync_scope(services, kind="subscription", scope_id=s) for s in subs)
            )

    mirror = await Mirror.load(settings.database_url)
    [update] = [d for d in mirror.deliveries if d.event_type == "member.updated"]
    assert (update.outcome, update.processed_at is not None) == ("synced", True)
