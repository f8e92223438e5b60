"""One scope, end to end: the simulated Polar over loopback HTTP -> arq job -> real database."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from arq.connections import ArqRedis
from sqlalchemy import select
from sqlmodel import col

from tests.support.settings import make_settings
from tests.support.workers import run_worker_until_idle
from worker import queue
from worker.models import Seat, SeatChange, SeatScope, SyncRun, seat_json
from worker.polar.errors import AuthError, TransientError
from worker.polar.schemas import CustomerSeat
from worker.resources import PolarResources, WorkerResources
from worker.simulator.server import SimulatedPolar
from worker.sync.scope import sync_scope


def normalised(seat: dict[str, Any]) -> dict[str, Any]:
    """Compare seats by value: parse both sides with the same model."""
    return CustomerSeat.model_validate(seat).model_dump(mode="json")


async def mirror(services: PolarResources) -> dict[str, Seat]:
    async with services.sessions() as session:
        return {s.id: s for s in (await session.execute(select(Seat))).scalars()}


def populated(sim: SimulatedPolar) -> str:
    sub = sim.state.create_subscription(seats=4)
    a = sim.state.assign(subscription_id=sub["id"], email="ann@example.com")
    b = sim.state.assign(subscription_id=sub["id"], email="ben@example.com", metadata={"team": "x"})
    sim.state.claim(b["id"])
    sim.state.assign(subscription_id=sub["id"], email="cat@example.com", immediate_claim=True)
    sim.state.revoke(a["id"])
    return str(sub["id"])


async def test_sync_mirrors_every_key_and_second_run_writes_nothing(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    sub_id = populated(sim)
    first = await sync_scope(services, kind="subscription", scope_id=sub_id)
    assert first.status == "ok" and first.result is not None
    assert first.result.inserted == 3
    polar_view = sim.state.list_seats(subscription_id=sub_id)
    mirrored = await mirror(services)
    assert {k: normalised(seat_json(v)) for k, v in mirrored.items()} == {
        s["id"]: normalised(s) for s in polar_view["seats"]
    }
    second = await sync_scope(services, kind="subscription", scope_id=sub_id)
    assert second.result is not None
    assert second.result.written == 0 and second.result.unchanged == 3
    async with services.sessions() as session:
        scope = await session.get(SeatScope, ("subscription", sub_id))
        runs = (await session.execute(select(SyncRun))).scalars().all()
    assert scope is not None
    assert (scope.total_seats, scope.available_seats) == (4, polar_view["available_seats"])
    assert [r.status for r in runs] == ["ok", "ok"]


async def test_order_scope_is_mirrored(sim: SimulatedPolar, services: PolarResources) -> None:
    order = sim.state.create_order(seats=2)
    sim.state.assign(order_id=order["id"], email="olga@example.com")
    outcome = await sync_scope(services, kind="order", scope_id=order["id"])
    assert outcome.result is not None and outcome.result.inserted == 1
    seats = await mirror(services)
    assert [s.order_id for s in seats.values()] == [order["id"]]


async def test_unknown_scope_is_marked_gone_and_seats_stay(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    sub_id = populated(sim)
    await sync_scope(services, kind="subscription", scope_id=sub_id)
    sim.state.subscriptions.pop(sub_id)
    sim.state._containers.pop(sub_id)  # the subscription disappears from Polar
    outcome = await sync_scope(services, kind="subscription", scope_id=sub_id)
    assert outcome.status == "gone"
    async with services.sessions() as session:
        scope = await session.get(SeatScope, ("subscription", sub_id))
    assert scope is not None and scope.gone_at is not None
    assert len(await mirror(services)) == 3


async def test_bad_token_fails_loudly_naming_the_variable(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub_id = populated(sim)
    settings = make_settings(database_url, sim, polar_access_token="polar_oat_wrong")
    services = await WorkerResources.create(settings, redis_url=redis_url)
    try:
        with pytest.raises(AuthError, match="POLAR_ACCESS_TOKEN") as info:
            await sync_scope(services, kind="subscription", scope_id=sub_id)
        assert "polar_oat_wrong" not in str(info.value)
        async with services.sessions() as session:
            scope = await session.get(SeatScope, ("subscription", sub_id))
            run = (await session.execute(select(SyncRun))).scalar_one()
        assert scope is not None and scope.consecutive_failures == 1
        assert run.status == "failed" and "401" in (run.error or "")
    finally:
        await services.aclose()


async def test_missing_read_scope_is_named(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub_id = populated(sim)
    sim.add_token("polar_oat_writeonly", {"customer_seats:write"})
    settings = make_settings(database_url, sim, polar_access_token="polar_oat_writeonly")
    services = await WorkerResources.create(settings, redis_url=redis_url)
    try:
        with pytest.raises(AuthError, match="customer_seats:read"):
            await sync_scope(services, kind="subscription", scope_id=sub_id)
    finally:
        await services.aclose()


async def test_disabled_seat_feature_is_named(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    sub_id = populated(sim)
    sim.state.seat_feature_enabled = False
    with pytest.raises(AuthError, match="FeatureNotEnabled"):
        await sync_scope(services, kind="subscription", scope_id=sub_id)


async def test_timeout_is_transient(sim: SimulatedPolar, database_url: str, redis_url: str) -> None:
    sub_id = populated(sim)
    sim.add_fault("/v1/customer-seats", "hang", hang_seconds=5, times=1)
    settings = make_settings(database_url, sim, polar_timeout_seconds=0.5)
    services = await WorkerResources.create(settings, redis_url=redis_url)
    try:
        with pytest.raises(TransientError, match="timed out"):
            await sync_scope(services, kind="subscription", scope_id=sub_id)
    finally:
        await services.aclose()


async def enqueue(services: PolarResources, scope_id: str) -> None:
    assert isinstance(services.redis, ArqRedis)
    assert await queue.request_sync(services.redis, "subscription", scope_id)


async def test_job_retries_5xx_then_succeeds(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub_id = populated(sim)
    settings = make_settings(database_url, sim, sync_retry_base_seconds=0.05)
    sim.add_fault("/v1/customer-seats", status=503, body={"detail": "unavailable"}, times=2)
    services = await WorkerResources.create(settings, redis_url=redis_url)
    try:
        await enqueue(services, sub_id)
        worker = await run_worker_until_idle(settings, redis_url)
        assert (worker.jobs_retried, worker.jobs_complete, worker.jobs_failed) == (2, 1, 0)
        assert len(await mirror(services)) == 3
        assert sim.log.count(method="GET", path_prefix="/v1/customer-seats") == 3
    finally:
        await services.aclose()


async def test_job_waits_out_a_429_then_succeeds(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub_id = populated(sim)
    settings = make_settings(database_url, sim)
    sim.add_fault("/v1/customer-seats", status=429, body="", headers={"retry-after": "1"}, times=1)
    services = await WorkerResources.create(settings, redis_url=redis_url)
    try:
        await enqueue(services, sub_id)
        started = time.monotonic()
        worker = await run_worker_until_idle(settings, redis_url)
        assert worker.jobs_complete == 1 and worker.jobs_failed == 0
        assert time.monotonic() - started >= 1.0  # it honoured retry-after
        assert len(await mirror(services)) == 3
        assert sim.log.count(path_prefix="/v1/customer-seats", status=429) == 1
    finally:
        await services.aclose()


async def test_job_with_bad_token_fails_without_retrying(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub_id = populated(sim)
    settings = make_settings(database_url, sim, polar_access_token="polar_oat_wrong")
    services = await WorkerResources.create(settings, redis_url=redis_url)
    try:
        await enqueue(services, sub_id)
        worker = await run_worker_until_idle(settings, redis_url)
        assert (worker.jobs_failed, worker.jobs_retried) == (1, 0)
        assert sim.log.count(path_prefix="/v1/customer-seats") == 1
    finally:
        await services.aclose()


async def test_history_lists_the_revoked_holder(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = sim.state.assign(subscription_id=sub["id"], email="zoe@example.com")
    sim.state.claim(seat["id"])
    await sync_scope(services, kind="subscription", scope_id=sub["id"])
    sim.state.revoke(seat["id"])
    again = sim.state.assign(subscription_id=sub["id"], email="yan@example.com")
    assert again["id"] == seat["id"]  # Polar reused the slot
    outcome = await sync_scope(services, kind="subscription", scope_id=sub["id"])
    assert outcome.result is not None
    [change] = outcome.result.changes
    assert (change.old_email, change.new_email) == ("zoe@example.com", "yan@example.com")
    async with services.sessions() as session:
        row = (await session.execute(select(Seat).where(col(Seat.id) == seat["id"]))).scalar_one()
    assert row.email == "yan@example.com" and row.status == "pending"


async def test_without_the_member_model_history_names_the_customer_email(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    # Without Polar's member model a seat's `email` is null: the holder's address is its
    # `customer_email`, and only the mirror remembers it once a revoke nulls the holder.
    sim.state.member_model_enabled = False
    sub = sim.state.create_subscription(seats=2)
    seat = sim.state.assign(subscription_id=sub["id"], email="legacy@example.com")
    assert seat["email"] is None and seat["customer_email"] == "legacy@example.com"
    await sync_scope(services, kind="subscription", scope_id=sub["id"])
    sim.state.revoke(seat["id"])
    await sync_scope(services, kind="subscription", scope_id=sub["id"])
    async with services.sessions() as session:
        changes = (
            (await session.execute(select(SeatChange).order_by(col(SeatChange.id)))).scalars().all()
        )
    assert [(c.change, c.old_email, c.new_email) for c in changes] == [
        ("created", None, "legacy@example.com"),
        ("status", "legacy@example.com", None),
    ]


async def test_a_cancel_just_after_the_reconcile_committed_leaves_the_run_ok(
    sim: SimulatedPolar, services: PolarResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shutdown cancels running jobs; one may land between the reconcile's commit and the
    # job's return. The sync happened: it must not be recorded as a failure.
    sub_id = populated(sim)

    class CancelWhenCounted:
        def labels(self, **_labels: str) -> CancelWhenCounted:
            return self

        def inc(self) -> None:
            raise asyncio.CancelledError

    monkeypatch.setattr("worker.sync.scope.metrics.SYNCS", CancelWhenCounted())
    with pytest.raises(asyncio.CancelledError):
        await sync_scope(services, kind="subscription", scope_id=sub_id)

    async with services.sessions() as session:
        scope = await session.get(SeatScope, ("subscription", sub_id))
        runs = (await session.execute(select(SyncRun))).scalars().all()
    assert scope is not None
    assert (scope.consecutive_failures, scope.last_error) == (0, None)
    assert [(run.status, run.error) for run in runs] == [("ok", None)]
    assert len(await mirror(services)) == 3
