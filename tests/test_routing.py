"""Events about people (customers, members) reach every scope whose seats they can change.

Polar changes a seat's address without a seat webhook: a member's e-mail change rewrites
`email` (only `member.updated`), and in organisations without the member model, where a
seat's address is `customer_email`, a customer's e-mail change rewrites it (only
`customer.updated`). A new member can become the holder of a seat that had none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from tests.support.mirror import mirrored_seat
from tests.support.settings import SIM_TOKEN, make_settings
from tests.support.workers import run_worker_until_idle
from worker.intake.receiver import running
from worker.intake.routing import RouteHint, ScopeRef, hint_for, route
from worker.models import Seat, SyncRun, WebhookDelivery, utcnow
from worker.platform.db import transaction
from worker.simulator.server import SimulatedPolar

TEAM = ScopeRef("subscription", "sub-team")
SOLO = ScopeRef("subscription", "sub-solo")
PASS = ScopeRef("order", "ord-pass")
OTHER = ScopeRef("subscription", "sub-other")


def legacy_seat(seat_id: str, scope: ScopeRef, customer_id: str, address: str) -> Seat:
    """A seat of an organisation without the member model: no member, no `email`."""
    return mirrored_seat(seat_id, scope, customer_id=customer_id, customer_email=address)


async def mirror(sessions: async_sessionmaker[AsyncSession], *seats: Seat) -> None:
    async with transaction(sessions) as session:
        session.add_all(seats)


async def routed(
    sessions: async_sessionmaker[AsyncSession], event_type: str, data: dict[str, Any]
) -> list[ScopeRef]:
    async with transaction(sessions) as session:
        return await route(session, event_type, data)


# ---------------------------------------------------------------------- payload alone


def test_customer_updated_points_at_the_customers_seats() -> None:
    hint = hint_for("customer.updated", {"id": "cus-1", "email": "new@example.com"})
    assert hint == RouteHint(customer_id="cus-1")


def test_member_created_points_at_seats_of_its_address_and_customer() -> None:
    hint = hint_for(
        "member.created", {"id": "mem-1", "customer_id": "cus-1", "email": "a@example.com"}
    )
    assert hint == RouteHint(
        member_id="mem-1",
        member_emails=("a@example.com",),
        customer_id="cus-1",
        customer_emails=("a@example.com",),
    )


# ---------------------------------------------------------------------- against the mirror


async def test_customer_updated_syncs_every_scope_holding_that_customers_seats(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await mirror(
        sessions,
        legacy_seat("seat-1", TEAM, "cus-ada", "ada@example.com"),
        legacy_seat("seat-2", PASS, "cus-ada", "ada@example.com"),
        legacy_seat("seat-3", OTHER, "cus-bob", "bob@example.com"),
    )
    scopes = await routed(
        sessions, "customer.updated", {"id": "cus-ada", "email": "ada.l@example.com"}
    )
    assert scopes == sorted([TEAM, PASS])


async def test_customer_updated_for_a_customer_without_seats_syncs_nothing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await mirror(sessions, legacy_seat("seat-1", TEAM, "cus-ada", "ada@example.com"))
    assert await routed(sessions, "customer.updated", {"id": "cus-zoe"}) == []
    assert await routed(sessions, "customer.updated", {"email": "ada@example.com"}) == []


async def test_customer_updated_also_syncs_scopes_whose_fetch_is_in_flight(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """A first sync of SOLO has read the customer's old address and not committed yet:
    the mirror cannot show the customer there, so SOLO must sync again."""
    async with transaction(sessions) as session:
        session.add(
            SyncRun(kind="scope", scope_kind=SOLO.kind, scope_id=SOLO.scope_id, started_at=utcnow())
        )
    assert await routed(sessions, "customer.updated", {"id": "cus-new"}) == [SOLO]


async def test_member_created_syncs_the_scope_of_a_seat_assigned_to_its_address(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await mirror(
        sessions,
        mirrored_seat("seat-1", TEAM, email="new@example.com", customer_id="cus-team"),
        legacy_seat("seat-2", SOLO, "cus-own", "new@example.com"),
        mirrored_seat("seat-3", OTHER, email="else@example.com", customer_id="cus-other"),
    )
    scopes = await routed(
        sessions,
        "member.created",
        {"id": "mem-new", "customer_id": "cus-none", "email": "new@example.com"},
    )
    assert scopes == sorted([TEAM, SOLO])


async def test_member_created_syncs_the_scopes_of_its_customer(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await mirror(
        sessions,
        mirrored_seat("seat-1", TEAM, email="first@example.com", customer_id="cus-team"),
        mirrored_seat("seat-2", PASS, email="second@example.com", customer_id="cus-team"),
        mirrored_seat("seat-3", OTHER, email="else@example.com", customer_id="cus-other"),
    )
    scopes = await routed(
        sessions,
        "member.created",
        {"id": "mem-new", "customer_id": "cus-team", "email": "third@example.com"},
    )
    assert scopes == sorted([TEAM, PASS])


async def test_member_created_for_nobody_in_the_mirror_syncs_nothing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await mirror(
        sessions, mirrored_seat("seat-1", TEAM, email="a@example.com", customer_id="cus-a")
    )
    scopes = await routed(
        sessions,
        "member.created",
        {"id": "mem-z", "customer_id": "cus-z", "email": "z@example.com"},
    )
    assert scopes == []


# ---------------------------------------------------------------------- end to end


@pytest.fixture
async def legacy_polar() -> AsyncIterator[SimulatedPolar]:
    """An organisation without the member model, whose endpoint secret Polar generated."""
    async with SimulatedPolar(token=SIM_TOKEN, seed=11, member_model=False) as polar:
        yield polar


async def test_a_customer_email_change_reaches_the_mirror_through_customer_updated(
    legacy_polar: SimulatedPolar,
    database_url: str,
    redis_url: str,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    state = legacy_polar.state
    settings = make_settings(
        database_url, legacy_polar, polar_webhook_secret=legacy_polar.webhooks.secret
    )
    async with running(settings, redis_url=redis_url) as url:
        legacy_polar.webhooks.configure(url=url)
        sub_id = state.create_subscription(seats=2)["id"]
        seat = state.assign(subscription_id=sub_id, email="lee@example.com")
        await legacy_polar.webhooks.flush()
        await run_worker_until_idle(settings, redis_url)
        async with sessions() as session:
            mirrored = await session.get(Seat, seat["id"])
        assert mirrored is not None
        assert (mirrored.email, mirrored.customer_email) == (None, "lee@example.com")

        already = len(state.events)
        state.update_customer_email(seat["customer_id"], "lee.new@example.com")
        assert [e.type for e in state.events[already:]] == ["customer.updated"]
        await legacy_polar.webhooks.flush()
        await run_worker_until_idle(settings, redis_url)

    async with sessions() as session:
        mirrored = await session.get(Seat, seat["id"])
        deliveries = (
            await session.execute(
                select(WebhookDelivery).where(col(WebhookDelivery.event_type) == "customer.updated")
            )
        ).scalars()
        outcomes = [d.outcome for d in deliveries]
    assert mirrored is not None
    assert mirrored.customer_email == "lee.new@example.com"
    assert outcomes == ["synced"]


def test_a_subscription_order_routes_to_its_subscription_not_a_new_order_scope() -> None:
    hint = hint_for(
        "order.paid",
        {
            "id": "ord-1",
            "seats": 5,
            "subscription_id": "sub-1",
            "billing_reason": "subscription_create",
        },
    )
    assert hint.scopes == (ScopeRef("subscription", "sub-1"),)
    assert ScopeRef("order", "ord-1") not in hint.scopes
