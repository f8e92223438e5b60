"""Full resync against the simulated Polar: discovery across pages, repair, resume, budget."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from tests.support.settings import SIM_TOKEN, make_settings
from worker.models import Seat, SeatScope, SyncRun, seat_json, utcnow
from worker.polar.schemas import CustomerSeat
from worker.resources import PolarResources, WorkerResources
from worker.simulator.server import SimulatedPolar
from worker.sync.resync import PassBusyError, _sync_item, resync_all
from worker.sync.scope import sync_scope

SUBSCRIPTIONS = 260
ORDERS = 15


@pytest.fixture
async def big_sim() -> AsyncIterator[SimulatedPolar]:
    """>250 subscriptions (every 10th without seats, one never started) and some orders."""
    polar = SimulatedPolar(token=SIM_TOKEN, seed=99)
    state = polar.state
    for i in range(SUBSCRIPTIONS):
        sub = state.create_subscription(seats=None if i % 10 == 0 else 2)
        if i % 10 != 0 and i % 3 == 0:
            state.assign(subscription_id=sub["id"], email=f"user{i}@example.com")
    state.create_subscription(seats=3, started=False)  # never started: Polar does not list it
    for i in range(ORDERS):
        order = state.create_order(seats=None if i % 5 == 0 else 1)
        if i % 5 != 0:
            state.assign(order_id=order["id"], email=f"buyer{i}@example.com")
    await polar.start()
    try:
        yield polar
    finally:
        await polar.stop()


def seat_based(sim: SimulatedPolar) -> set[tuple[str, str]]:
    subs = {
        ("subscription", s["id"])
        for s in sim.state.subscriptions.values()
        if s["seats"] is not None and s["started_at"] is not None
    }
    orders = {
        ("order", o["id"])
        for o in sim.state.orders.values()
        if o["seats"] is not None and o.get("subscription_id") is None
    }
    return subs | orders


async def assert_mirror_equals_polar(services: PolarResources, sim: SimulatedPolar) -> None:
    expected: dict[str, dict[str, object]] = {}
    for kind, scope_id in seat_based(sim):
        key = "subscription_id" if kind == "subscription" else "order_id"
        for s in sim.state.list_seats(**{key: scope_id})["seats"]:
            expected[s["id"]] = CustomerSeat.model_validate(s).model_dump(mode="json")
    async with services.sessions() as session:
        rows = (await session.execute(select(Seat))).scalars().all()
    got = {r.id: CustomerSeat.model_validate(seat_json(r)).model_dump(mode="json") for r in rows}
    assert got == expected


async def open_services(
    database_url: str, sim: SimulatedPolar, redis_url: str, **extra: object
) -> WorkerResources:
    return await WorkerResources.create(
        make_settings(database_url, sim, **extra), redis_url=redis_url
    )


async def test_full_resync_finds_every_seat_based_scope_across_pages(
    big_sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    services = await open_services(database_url, big_sim, redis_url)
    try:
        summary = await resync_all(services, trigger="cli", force=True)
        assert summary is not None
        expected = seat_based(big_sim)
        assert summary.scopes == len(expected)
        async with services.sessions() as session:
            scopes = {
                (s.kind, s.scope_id) for s in (await session.execute(select(SeatScope))).scalars()
            }
        assert scopes == expected
        pages = math.ceil((SUBSCRIPTIONS) / 100) + math.ceil(ORDERS / 100)
        assert (
            big_sim.log.count(path_prefix="/v1/subscriptions")
            + big_sim.log.count(path_prefix="/v1/orders")
            == pages
        )
        assert big_sim.log.count(path_prefix="/v1/customer-seats") == len(expected)
        assert summary.api_calls == pages + len(expected)
        await assert_mirror_equals_polar(services, big_sim)
    finally:
        await services.aclose()


async def test_a_page_that_failed_is_asked_again_and_the_pages_after_it_are_found(
    big_sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    """Polar answers 503 to the second page of subscriptions, once: the pass asks for that
    page again and still finds every scope, including those on the third page."""
    big_sim.add_fault("/v1/subscriptions/?page=2&", status=503, times=1, method="GET")
    services = await open_services(database_url, big_sim, redis_url, sync_retry_base_seconds=0.01)
    try:
        summary = await resync_all(services, trigger="cli", force=True)
        assert summary is not None
        assert summary.scopes == len(seat_based(big_sim))
        listed = big_sim.log.select(method="GET", path_prefix="/v1/subscriptions")
        assert [r.query["page"] for r in listed] == ["1", "2", "2", "3"]
        await assert_mirror_equals_polar(services, big_sim)
    finally:
        await services.aclose()


async def scopes_after_a_pass(services: PolarResources) -> set[tuple[str, str]]:
    summary = await resync_all(services, trigger="cli", force=True)
    assert summary is not None and summary.failed == 0
    async with services.sessions() as session:
        return {(s.kind, s.scope_id) for s in (await session.execute(select(SeatScope))).scalars()}


async def test_discovery_asks_only_for_one_time_orders(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    # A seat-based subscription's first order repeats its `seats`; the seats themselves are
    # listed under the subscription.
    sub = sim.state.create_subscription(seats=3, with_order=True)
    sim.state.assign(subscription_id=sub["id"], email="sub@example.com")
    one_time = sim.state.create_order(seats=2)
    sim.state.assign(order_id=one_time["id"], email="buyer@example.com")
    [sub_order] = [o for o in sim.state.orders.values() if o["subscription_id"] == sub["id"]]
    assert sub_order["seats"] == 3

    scopes = await scopes_after_a_pass(services)

    assert scopes == {("subscription", sub["id"]), ("order", one_time["id"])}
    [listing] = sim.log.select(method="GET", path_prefix="/v1/orders")
    assert listing.query["product_billing_type"] == "one_time"
    assert sim.log.count(path_prefix="/v1/customer-seats", query={"order_id": sub_order["id"]}) == 0


async def test_discovery_skips_a_listed_order_that_belongs_to_a_subscription(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    sub = sim.state.create_subscription(seats=3)
    # However the list is filtered, an order with a subscription is the subscription's.
    stray = sim.state.create_order(seats=3)
    sim.state.orders[stray["id"]].update(
        subscription_id=sub["id"], billing_reason="subscription_create"
    )

    scopes = await scopes_after_a_pass(services)

    assert scopes == {("subscription", sub["id"])}
    assert sim.log.count(path_prefix="/v1/customer-seats", query={"order_id": stray["id"]}) == 0


async def test_full_resync_repairs_dropped_webhooks_and_marks_gone_scopes(
    big_sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    services = await open_services(database_url, big_sim, redis_url)
    try:
        await resync_all(services, trigger="cli", force=True)
        # Changes whose webhooks never arrived:
        state = big_sim.state
        seats = [s for s in state.seats.values() if s["status"] == "pending"]
        state.claim(seats[0]["id"])
        state.revoke(seats[1]["id"])
        sub_id = seats[2]["subscription_id"] or seats[3]["subscription_id"]
        state.cancel_subscription(sub_id)
        gone_id = next(
            iter(k for k, v in state.subscriptions.items() if v["seats"] and k != sub_id)
        )
        state.subscriptions.pop(gone_id)
        state._containers.pop(gone_id)
        summary = await resync_all(services, trigger="cli", force=True)
        assert summary is not None and summary.gone == 1 and summary.failed == 0
        assert summary.seats_changed >= 3
        async with services.sessions() as session:
            gone = await session.get(SeatScope, ("subscription", gone_id))
        assert gone is not None and gone.gone_at is not None
        await assert_mirror_equals_polar(services, big_sim)
    finally:
        await services.aclose()


async def test_killed_pass_resumes_instead_of_starting_over(
    big_sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    services = await open_services(database_url, big_sim, redis_url)
    try:
        halfway = asyncio.Event()

        def watch(done: int, total: int) -> None:
            if done >= total // 2:
                halfway.set()

        first = asyncio.create_task(
            resync_all(services, trigger="cron", force=True, progress=watch)
        )
        await halfway.wait()
        first.cancel()  # the process dies half way
        with pytest.raises(asyncio.CancelledError):
            await first
        calls_before = big_sim.log.count(path_prefix="/v1/customer-seats")
        assert 0 < calls_before < len(seat_based(big_sim))

        summary = await resync_all(services, trigger="cron")  # not forced: it resumes
        assert summary is not None and summary.resumed
        assert summary.scopes == len(seat_based(big_sim))
        list_calls = big_sim.log.count(path_prefix="/v1/customer-seats")
        in_flight = services.settings.resync_concurrency
        assert list_calls <= len(seat_based(big_sim)) + in_flight
        page_calls = big_sim.log.count(path_prefix="/v1/subscriptions")
        assert page_calls == math.ceil(SUBSCRIPTIONS / 100)  # discovery was not redone
        async with services.sessions() as session:
            runs = (
                (await session.execute(select(SyncRun).where(col(SyncRun.kind) == "full")))
                .scalars()
                .all()
            )
        assert [(r.status, r.finished_at is not None) for r in runs] == [("ok", True)]
        await assert_mirror_equals_polar(services, big_sim)
    finally:
        await services.aclose()


async def test_pass_is_not_repeated_before_its_interval(
    big_sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    services = await open_services(database_url, big_sim, redis_url)
    try:
        assert await resync_all(services, trigger="cron") is not None
        assert await resync_all(services, trigger="cron") is None
    finally:
        await services.aclose()


async def test_only_one_pass_runs_across_the_fleet(
    big_sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    a = await open_services(database_url, big_sim, redis_url)
    b = await open_services(database_url, big_sim, redis_url)
    try:
        started = asyncio.Event()
        task = asyncio.create_task(
            resync_all(a, force=True, progress=lambda done, total: started.set())
        )
        await started.wait()
        with pytest.raises(PassBusyError):
            await resync_all(b, force=True)
        assert await task is not None
    finally:
        await a.aclose()
        await b.aclose()


async def test_scope_synced_during_the_pass_is_skipped(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    sub = sim.state.create_subscription(seats=2)
    pass_run = SyncRun(kind="full", started_at=utcnow() - timedelta(seconds=1), id=1)
    await sync_scope(services, kind="subscription", scope_id=sub["id"])  # a webhook sync
    calls = sim.log.count(path_prefix="/v1/customer-seats")
    outcome, api_calls, _ = await _sync_item(services, pass_run, "subscription", sub["id"])
    assert (outcome, api_calls) == ("skipped", 0)
    assert sim.log.count(path_prefix="/v1/customer-seats") == calls


async def test_two_workers_share_one_budget_without_429(
    big_sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    window, limit = 1.0, 60
    big_sim.set_rate_limit(limit, window)
    extra = {"polar_requests_per_minute": int(limit * 0.9), "polar_rate_window_seconds": window}
    a = await open_services(database_url, big_sim, redis_url, **extra)
    b = await open_services(database_url, big_sim, redis_url, **extra)
    try:
        scopes = sorted(seat_based(big_sim))[:40]

        async def webhook_worker() -> None:
            for kind, scope_id in scopes:
                await sync_scope(b, kind=kind, scope_id=scope_id, lane="webhook")

        await asyncio.gather(resync_all(a, force=True), webhook_worker())
        assert big_sim.log.count(status=429) == 0
        assert big_sim.log.max_in_any_window(window) <= limit
        total = big_sim.log.count(path_prefix="/v1/")
        assert total > 3 * limit  # it really spanned several windows
        await assert_mirror_equals_polar(a, big_sim)
        async with a.sessions() as session:
            count = (
                await session.execute(select(func.count()).select_from(SeatScope))
            ).scalar_one()
        assert count == len(seat_based(big_sim))
    finally:
        await a.aclose()
        await b.aclose()
