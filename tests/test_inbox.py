"""Routing of events to scopes, the durable inbox and the sweeper that loses nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis, create_pool
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlmodel import col

from worker import queue
from worker.config import Settings
from worker.intake.inbox import (
    SWEEP_MIN_AGE,
    mark_scope_synced,
    record_delivery,
    sweep_inbox,
    sweep_min_age,
)
from worker.intake.routing import RouteHint, ScopeRef, hint_for, route
from worker.models import Seat, SeatScope, WebhookDelivery, WebhookDeliveryScope, utcnow
from worker.platform.db import create_engine, session_factory, transaction
from worker.schedule.jobs import build_worker

SUB = ScopeRef("subscription", "sub-1")
ORDER = ScopeRef("order", "ord-1")


# ---------------------------------------------------------------------- pure routing


def test_seat_events_route_to_their_subscription_or_order() -> None:
    assert hint_for("customer_seat.assigned", {"id": "s", "subscription_id": "sub-1"}).scopes == (
        SUB,
    )
    assert hint_for(
        "customer_seat.revoked", {"id": "s", "subscription_id": None, "order_id": "ord-1"}
    ).scopes == (ORDER,)


@pytest.mark.parametrize(
    "data",
    [
        {"id": "sub-1", "seats": 5},
        {"id": "sub-1", "seats": 0},
        {"id": "sub-1", "seats": None, "prices": [{"amount_type": "seat_based"}]},
        {"id": "sub-1", "product": {"prices": [{"amount_type": "seat_based"}]}},
        {"id": "sub-1", "seats": None, "pending_update": {"seats": 3}},
    ],
)
def test_seat_based_subscription_events_route_to_the_subscription(data: dict[str, Any]) -> None:
    assert hint_for("subscription.updated", data).scopes == (SUB,)


def test_other_subscriptions_route_only_if_the_mirror_knows_them() -> None:
    hint = hint_for(
        "subscription.updated", {"id": "sub-1", "seats": None, "prices": [{"amount_type": "x"}]}
    )
    assert hint.scopes == ()
    assert hint.if_known == (SUB,)
    assert hint_for("subscription.updated", {"id": "sub-1", "seats": True}).scopes == ()


def test_orders_with_seats_route_to_the_order() -> None:
    assert hint_for("order.paid", {"id": "ord-1", "seats": 3}).scopes == (ORDER,)
    assert hint_for("order.paid", {"id": "ord-1"}).scopes == ()


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("checkout.created", {"id": "c", "subscription_id": "sub-1"}),
        ("customer.created", {"id": "cus", "email": "a@example.com"}),
        ("customer_seat.assigned", "not an object"),
        ("benefit.created", {"id": "b", "customer_id": "cus"}),
    ],
)
def test_other_events_route_nowhere(event_type: str, data: Any) -> None:
    hint = hint_for(event_type, data)
    assert hint == RouteHint()


# ---------------------------------------------------------------------- database


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    created = create_engine(database_url)
    yield created
    await created.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return session_factory(engine)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(queue.redis_settings(redis_url))
    yield pool
    await pool.aclose()


def mirrored_seat(seat_id: str, scope: ScopeRef, **values: Any) -> Seat:
    now = utcnow()
    return Seat(
        id=seat_id,
        created_at=now,
        synced_at=now,
        status=values.pop("status", "claimed"),
        subscription_id=scope.scope_id if scope.kind == "subscription" else None,
        order_id=scope.scope_id if scope.kind == "order" else None,
        **values,
    )


async def test_member_events_route_to_every_scope_holding_the_member(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    other = ScopeRef("subscription", "sub-2")
    async with transaction(sessions) as session:
        session.add(mirrored_seat("seat-1", SUB, member_id="mem-1", email="old@example.com"))
        session.add(mirrored_seat("seat-2", ORDER, member_id=None, email="old@example.com"))
        session.add(mirrored_seat("seat-3", other, member_id="mem-2", email="x@example.com"))
    async with transaction(sessions) as session:
        by_id = await route(session, "member.updated", {"id": "mem-1", "email": "new@ex.com"})
        by_email = await route(
            session, "member.deleted", {"id": "mem-9", "email": "old@example.com"}
        )
    assert by_id == [SUB]
    assert by_email == sorted([SUB, ORDER])


async def test_seat_event_without_a_container_finds_the_slot_in_the_mirror(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with transaction(sessions) as session:
        session.add(mirrored_seat("seat-1", ORDER))
    async with transaction(sessions) as session:
        assert await route(session, "customer_seat.revoked", {"id": "seat-1"}) == [ORDER]
        assert await route(session, "customer_seat.revoked", {"id": "seat-unknown"}) == []


async def test_a_mirrored_subscription_that_lost_its_seats_is_still_synced(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with transaction(sessions) as session:
        session.add(SeatScope(kind="subscription", scope_id="sub-1", created_at=utcnow()))
    async with transaction(sessions) as session:
        known = await route(session, "subscription.updated", {"id": "sub-1", "seats": None})
        unknown = await route(session, "subscription.updated", {"id": "sub-9", "seats": None})
    assert known == [SUB]
    assert unknown == []


async def record(
    sessions: async_sessionmaker[AsyncSession],
    webhook_id: str,
    event_type: str,
    data: dict[str, Any],
    *,
    age: timedelta = timedelta(0),
) -> Any:
    envelope = {"type": event_type, "timestamp": "2026-01-01T00:00:00Z", "data": data}
    async with transaction(sessions) as session:
        return await record_delivery(
            session,
            webhook_id=webhook_id,
            event_type=event_type,
            payload=json.dumps(envelope),
            envelope=envelope,
            now=utcnow() - age,
        )


async def test_a_known_webhook_id_is_a_duplicate_and_writes_nothing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    first = await record(sessions, "msg-1", "order.paid", {"id": "ord-1", "seats": 2})
    again = await record(sessions, "msg-1", "order.paid", {"id": "ord-2", "seats": 2})
    assert (first.duplicate, first.scopes) == (False, (ORDER,))
    assert (again.duplicate, again.scopes) == (True, ())
    async with sessions() as session:
        scopes = (await session.execute(select(WebhookDeliveryScope))).scalars().all()
        row = await session.get(WebhookDelivery, "msg-1")
    assert [(s.scope_kind, s.scope_id) for s in scopes] == [("order", "ord-1")]
    assert row is not None and row.event_timestamp is not None
    assert row.event_timestamp.year == 2026


async def queued_scopes(redis_url: str) -> list[str]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = await client.keys("seat-sync:queued:*")
        return sorted(k.decode().removeprefix("seat-sync:queued:") for k in keys)
    finally:
        await client.aclose()


async def test_sweep_requests_a_sync_for_old_unanswered_deliveries_only(
    sessions: async_sessionmaker[AsyncSession], redis: ArqRedis, redis_url: str
) -> None:
    old = timedelta(minutes=2)
    await record(sessions, "old", "customer_seat.claimed", {"subscription_id": "sub-1"}, age=old)
    await record(sessions, "fresh", "customer_seat.claimed", {"order_id": "ord-1"})
    await record(sessions, "done", "customer_seat.claimed", {"subscription_id": "sub-3"}, age=old)
    async with transaction(sessions) as session:
        now = utcnow()
        await mark_scope_synced(
            session, kind="subscription", scope_id="sub-3", fetched_after=now, now=now,
            sync_run_id=None,
        )  # fmt: skip

    result = await sweep_inbox(sessions, redis, min_age=timedelta(seconds=30))

    assert result.scopes == [SUB]
    assert result.requested == 1
    assert await queued_scopes(redis_url) == ["subscription:sub-1"]
    assert await redis.zcard(queue.QUEUE_NAME) == 1
    again = await sweep_inbox(sessions, redis, min_age=timedelta(seconds=30))
    assert (again.requested, again.already_waiting) == (0, 1)


async def test_the_sweeper_leaves_a_delivery_its_follow_up_may_still_be_waiting_for(
    sessions: async_sessionmaker[AsyncSession], redis: ArqRedis, redis_url: str
) -> None:
    window = queue.SyncWindow(quiet=0.5, max_wait=30.0)
    # Older than the receiver's hand-off to Redis, younger than that plus the maximum wait:
    waiting = timedelta(seconds=25)
    await record(sessions, "waiting", "customer_seat.claimed", {"order_id": "ord-1"}, age=waiting)
    lost = timedelta(seconds=45)
    await record(sessions, "lost", "customer_seat.claimed", {"subscription_id": "sub-1"}, age=lost)

    result = await sweep_inbox(sessions, redis, min_age=sweep_min_age(window), window=window)

    assert sweep_min_age(window) == SWEEP_MIN_AGE + timedelta(seconds=30)
    assert result.scopes == [SUB]
    assert await queued_scopes(redis_url) == ["subscription:sub-1"]


async def test_sweep_routes_deliveries_stored_unrouted(
    sessions: async_sessionmaker[AsyncSession], redis: ArqRedis
) -> None:
    received = utcnow() - timedelta(minutes=5)
    async with transaction(sessions) as session:
        for webhook_id, event_type, data in [
            ("seat", "customer_seat.assigned", {"order_id": "ord-1"}),
            ("other", "benefit.created", {"id": "b"}),
        ]:
            body = json.dumps({"type": event_type, "data": data})
            session.add(
                WebhookDelivery(
                    webhook_id=webhook_id,
                    event_type=event_type,
                    payload=body,
                    received_at=received,
                    error="routing failed: KeyError",
                )
            )

    result = await sweep_inbox(sessions, redis, min_age=timedelta(seconds=30))

    assert result.routed == 2
    assert result.scopes == [ORDER]
    async with sessions() as session:
        seat = await session.get(WebhookDelivery, "seat")
        other = await session.get(WebhookDelivery, "other")
    assert seat is not None and seat.routed_at is not None and seat.processed_at is None
    assert seat.error is None
    assert other is not None and other.outcome == "ignored" and other.processed_at is not None


async def test_a_sync_answers_only_deliveries_recorded_before_its_fetch_started(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await record(sessions, "before", "customer_seat.claimed", {"subscription_id": "sub-1"})
    fetch_started = utcnow()
    await record(sessions, "after", "customer_seat.revoked", {"subscription_id": "sub-1"})
    async with transaction(sessions) as session:
        await mark_scope_synced(
            session, kind="subscription", scope_id="sub-1", fetched_after=fetch_started,
            now=utcnow(), sync_run_id=None,
        )  # fmt: skip
    async with sessions() as session:
        rows = {
            d.webhook_id: d
            for d in (await session.execute(select(WebhookDelivery))).scalars().all()
        }
        open_scopes = (
            await session.execute(
                select(col(WebhookDeliveryScope.webhook_id)).where(
                    col(WebhookDeliveryScope.processed_at).is_(None)
                )
            )
        ).scalars()
        assert list(open_scopes) == ["after"]
    assert rows["before"].outcome == "synced"
    assert rows["after"].processed_at is None


def test_the_worker_sweeps_at_startup_and_every_fifteen_seconds() -> None:
    settings = Settings(database_url="sqlite:///unused.db", polar_access_token="t")
    worker = build_worker(settings, "redis://127.0.0.1:6379/9", burst=True, handle_signals=False)
    (sweep,) = [c for c in worker.cron_jobs if c.name == queue.SWEEP_INBOX]
    assert sweep.run_at_startup
    assert sweep.unique
    assert sweep.second == {0, 15, 30, 45} and sweep.minute is None
    assert queue.SWEEP_INBOX in worker.functions
