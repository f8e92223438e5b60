"""Reminders (once per invitation) and opt-in renewal, against the simulated Polar."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import select
from sqlmodel import SQLModel

from tests.support.settings import make_settings
from tests.support.simulated import polar_from_the_past
from tests.support.workers import worker_resources
from worker.models import InvitationReminder, InvitationRenewal
from worker.resources import Resources, WorkerResources
from worker.schedule import invitations
from worker.simulator.server import SimulatedPolar
from worker.sync.scope import sync_scope

HOUR = 3600.0
Row = TypeVar("Row", bound=SQLModel)


class Crash(BaseException):
    """Stands in for the process dying at a precise point."""


@pytest.fixture
async def past_sim() -> AsyncIterator[SimulatedPolar]:
    async with polar_from_the_past(seed=5) as polar:
        yield polar


@pytest.fixture
async def legacy_sim() -> AsyncIterator[SimulatedPolar]:
    """An organisation without Polar's member model: a seat's `email` is null and the
    holder's address is its `customer_email`."""
    async with polar_from_the_past(seed=5, member_model=False) as polar:
        yield polar


@pytest.fixture
async def services_for(database_url: str, redis_url: str) -> AsyncIterator[Any]:
    """Opens worker resources on a simulator (with extra settings); all closed at the end."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(sim: SimulatedPolar, **extra: Any) -> WorkerResources:
            extra.setdefault("remind_spread_seconds", 0.0)
            settings = make_settings(database_url, sim, **extra)
            return await stack.enter_async_context(worker_resources(settings, redis_url))

        yield factory


def scenario(sim: SimulatedPolar) -> dict[str, Any]:
    """Seats in every state; only `expiring` should be reminded, only `expired` renewed."""
    state = sim.state
    sub = state.create_subscription(seats=8)
    sid = sub["id"]
    expired = state.assign(subscription_id=sid, email="late@example.com")  # T-30h: expired at T-6h
    state.advance(10 * HOUR)  # T-20h: these expire at T+4h, inside the 6 h window
    expiring = state.assign(subscription_id=sid, email="soon@example.com")
    claimed = state.assign(subscription_id=sid, email="done@example.com")
    state.claim(claimed["id"])
    revoked = state.assign(subscription_id=sid, email="gone@example.com")
    state.revoke(revoked["id"])
    instant = state.assign(subscription_id=sid, email="instant@example.com", immediate_claim=True)
    state.advance(16 * HOUR)  # T-4h: expires at T+20h, outside the window
    far = state.assign(subscription_id=sid, email="far@example.com")
    state.advance(4 * HOUR)  # now
    return {
        "sub": sid,
        "expired": expired,
        "far": far,
        "expiring": expiring,
        "claimed": claimed,
        "revoked": revoked,
        "instant": instant,
    }


async def rows(services: Resources, table: type[Row]) -> list[Row]:
    """Every row of `table` (reminders or renewals recorded)."""
    async with services.sessions() as session:
        return list((await session.execute(select(table))).scalars())


async def test_exactly_one_reminder_per_invitation_across_workers_and_runs(
    past_sim: SimulatedPolar, services_for: Any
) -> None:
    seats = scenario(past_sim)
    a: WorkerResources = await services_for(past_sim)
    b: WorkerResources = await services_for(past_sim)
    await sync_scope(a, kind="subscription", scope_id=seats["sub"])
    plan = await invitations.remind_expiring(a, dry_run=True)
    assert [p.seat_id for p in plan.planned] == [seats["expiring"]["id"]]
    assert past_sim.state.resend_count(seats["expiring"]["id"]) == 0  # dry run sent nothing

    await asyncio.gather(invitations.remind_expiring(a), invitations.remind_expiring(b))
    for _ in range(3):  # later cron runs
        await invitations.remind_expiring(a)
    state = past_sim.state
    assert state.resend_count(seats["expiring"]["id"]) == 1
    for other in ("expired", "far", "claimed", "revoked", "instant"):
        assert state.resend_count(seats[other]["id"]) == 0, other
    [row] = await rows(a, InvitationReminder)
    assert (row.outcome, row.recipient) == ("sent", "soon@example.com")
    assert row.invitation_expires_at == datetime.fromisoformat(
        seats["expiring"]["invitation_token_expires_at"].replace("Z", "+00:00")
    )


async def test_claimed_meanwhile_is_recorded_and_resynced(
    past_sim: SimulatedPolar, services_for: Any
) -> None:
    seats = scenario(past_sim)
    services: WorkerResources = await services_for(past_sim)
    await sync_scope(services, kind="subscription", scope_id=seats["sub"])
    past_sim.state.claim(seats["expiring"]["id"])  # the mirror still says pending
    report = await invitations.remind_expiring(services)
    assert report.outcomes == {"not_pending": 1}
    assert await services.redis.zcard("seat-sync:queue") == 1  # a sync of the scope was queued
    await invitations.remind_expiring(services)
    assert [r.outcome for r in await rows(services, InvitationReminder)] == ["not_pending"]


async def test_invalid_token_is_recorded_and_not_retried(
    past_sim: SimulatedPolar, services_for: Any
) -> None:
    seats = scenario(past_sim)
    services: WorkerResources = await services_for(past_sim)
    await sync_scope(services, kind="subscription", scope_id=seats["sub"])
    past_sim.state.drop_invitation_token(seats["expiring"]["id"])
    assert (await invitations.remind_expiring(services)).outcomes == {"invalid_token": 1}
    assert (await invitations.remind_expiring(services)).outcomes == {}
    resends = past_sim.log.count(method="POST", path_prefix="/v1/customer-seats/")
    assert resends == 1


async def test_crash_between_call_and_record_never_sends_twice(
    past_sim: SimulatedPolar, services_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seats = scenario(past_sim)
    services: WorkerResources = await services_for(past_sim)
    await sync_scope(services, kind="subscription", scope_id=seats["sub"])

    async def crash(*_args: Any, **_kwargs: Any) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(invitations, "_record_reminder", crash)
        with pytest.raises(Crash):
            await invitations.remind_expiring(services)
    assert past_sim.state.resend_count(seats["expiring"]["id"]) == 1
    await invitations.remind_expiring(services)  # the next cron run
    assert past_sim.state.resend_count(seats["expiring"]["id"]) == 1
    monkeypatch.setattr(invitations, "STALE_SENDING", timedelta(0))
    await invitations.remind_expiring(services)
    [row] = await rows(services, InvitationReminder)
    assert row.outcome == "unknown"
    assert past_sim.state.resend_count(seats["expiring"]["id"]) == 1


def pending_for(sim: SimulatedPolar, sub_id: str, email: str) -> list[dict[str, Any]]:
    """Pending seats held at `email`, whether as a member or, without the member model, as
    a customer."""
    return [
        s
        for s in sim.state.list_seats(subscription_id=sub_id)["seats"]
        if s["status"] == "pending" and (s["email"] or s["customer_email"]) == email
    ]


async def test_expired_invitee_gets_one_fresh_invitation(
    past_sim: SimulatedPolar, services_for: Any
) -> None:
    seats = scenario(past_sim)
    services: WorkerResources = await services_for(past_sim, renew_expired_invitations=True)
    await sync_scope(services, kind="subscription", scope_id=seats["sub"])
    plan = await invitations.renew_expired(services, dry_run=True)
    assert [p.recipient for p in plan.planned] == ["late@example.com"]
    assert past_sim.log.count(method="DELETE") == 0

    report = await invitations.renew_expired(services)
    assert report.outcomes == {"assigned": 1}
    [fresh] = pending_for(past_sim, seats["sub"], "late@example.com")
    new_expiry = datetime.fromisoformat(fresh["invitation_token_expires_at"].replace("Z", "+00:00"))
    assert new_expiry > datetime.now(UTC) + timedelta(hours=23)
    await sync_scope(services, kind="subscription", scope_id=seats["sub"])
    assert (await invitations.renew_expired(services)).outcomes == {}
    assert len(pending_for(past_sim, seats["sub"], "late@example.com")) == 1
    [row] = await rows(services, InvitationRenewal)
    assert (row.state, row.new_seat_id) == ("assigned", fresh["id"])


async def test_crash_between_revoke_and_assign_is_recovered(
    past_sim: SimulatedPolar, services_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seats = scenario(past_sim)
    services: WorkerResources = await services_for(past_sim, renew_expired_invitations=True)
    await sync_scope(services, kind="subscription", scope_id=seats["sub"])
    polar = services.polar
    real_assign = polar.assign

    async def die(*_args: Any, **_kwargs: Any) -> Any:
        raise Crash

    monkeypatch.setattr(polar, "assign", die)
    with pytest.raises(Crash):
        await invitations.renew_expired(services)
    assert (
        pending_for(past_sim, seats["sub"], "late@example.com") == []
    )  # revoked, not yet re-invited
    [row] = await rows(services, InvitationRenewal)
    assert row.state == "revoked"

    monkeypatch.setattr(polar, "assign", real_assign)
    report = await invitations.renew_expired(services)  # the next run resumes
    assert report.outcomes == {"assigned": 1}
    assert len(pending_for(past_sim, seats["sub"], "late@example.com")) == 1
    assert past_sim.log.count(method="POST", path_prefix="/v1/customer-seats", status=200) == 1


async def test_crash_after_assign_before_record_does_not_assign_twice(
    past_sim: SimulatedPolar, services_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seats = scenario(past_sim)
    services: WorkerResources = await services_for(past_sim, renew_expired_invitations=True)
    await sync_scope(services, kind="subscription", scope_id=seats["sub"])
    real_set = invitations._set_renewal

    async def crash_on_assigned(svc: Resources, row_id: int, **values: Any) -> None:
        if values.get("state") == "assigned":
            raise Crash
        await real_set(svc, row_id, **values)

    monkeypatch.setattr(invitations, "_set_renewal", crash_on_assigned)
    with pytest.raises(Crash):
        await invitations.renew_expired(services)
    assert await services.redis.zcard("seat-sync:queue") == 0  # died before asking a sync
    monkeypatch.setattr(invitations, "_set_renewal", real_set)
    await invitations.renew_expired(services)
    assert len(pending_for(past_sim, seats["sub"], "late@example.com")) == 1
    [row] = await rows(services, InvitationRenewal)
    assert row.state == "assigned"
    # Resumed as SeatAlreadyAssigned, it still has the scope synced, so the mirror does
    # not keep the expired invitation until the next full resync.
    assert await services.redis.zcard("seat-sync:queue") == 1


async def test_a_renewal_deferred_by_a_polar_error_still_has_the_scope_synced(
    past_sim: SimulatedPolar, services_for: Any
) -> None:
    """The revoke went through, the assign failed: Polar's seats changed all the same."""
    seats = scenario(past_sim)
    services: WorkerResources = await services_for(past_sim, renew_expired_invitations=True)
    await sync_scope(services, kind="subscription", scope_id=seats["sub"])
    past_sim.add_fault("/v1/customer-seats", status=503, method="POST", times=None)
    report = await invitations.renew_expired(services)
    assert report.outcomes == {"deferred": 1}
    assert past_sim.state.get_seat(seats["expired"]["id"])["status"] == "revoked"
    [row] = await rows(services, InvitationRenewal)
    assert row.state == "revoked"
    assert await services.redis.zcard("seat-sync:queue") == 1


async def test_slot_taken_between_revoke_and_assign_is_reported(
    past_sim: SimulatedPolar, services_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = past_sim.state
    sub = state.create_subscription(seats=1)
    state.assign(subscription_id=sub["id"], email="late@example.com")
    state.advance(30 * HOUR)
    services: WorkerResources = await services_for(past_sim, renew_expired_invitations=True)
    await sync_scope(services, kind="subscription", scope_id=sub["id"])
    polar = services.polar
    real_revoke = polar.revoke

    async def revoke_then_someone_takes_it(seat_id: str, **kwargs: Any) -> Any:
        seat = await real_revoke(seat_id, **kwargs)
        state.assign(subscription_id=sub["id"], email="quick@example.com")
        return seat

    monkeypatch.setattr(polar, "revoke", revoke_then_someone_takes_it)
    report = await invitations.renew_expired(services)
    assert report.outcomes == {"slot_taken": 1}
    [row] = await rows(services, InvitationRenewal)
    assert row.state == "slot_taken" and "SeatNotAvailable" in (row.error or "")


# ---------------------------------------------------------------------- without the member model


def address_of(seat: dict[str, Any]) -> tuple[str | None, str | None]:
    return seat["email"], seat["customer_email"]


async def test_a_legacy_organisation_seat_gets_exactly_one_reminder(
    legacy_sim: SimulatedPolar, services_for: Any
) -> None:
    state = legacy_sim.state
    sub_id = state.create_subscription(seats=3)["id"]
    state.advance(10 * HOUR)
    seat = state.assign(subscription_id=sub_id, email="lee@example.com")
    state.advance(20 * HOUR)  # its invitation expires in 4 h: inside the 6 h window
    assert address_of(seat) == (None, "lee@example.com")
    a: WorkerResources = await services_for(legacy_sim)
    b: WorkerResources = await services_for(legacy_sim)
    await sync_scope(a, kind="subscription", scope_id=sub_id)

    await asyncio.gather(invitations.remind_expiring(a), invitations.remind_expiring(b))
    for _ in range(3):  # later cron runs
        await invitations.remind_expiring(a)

    assert state.resend_count(seat["id"]) == 1
    [row] = await rows(a, InvitationReminder)
    assert (row.outcome, row.recipient, row.seat_id) == ("sent", "lee@example.com", seat["id"])


async def test_a_legacy_organisation_expired_invitation_is_renewed_to_its_customer_email(
    legacy_sim: SimulatedPolar, services_for: Any
) -> None:
    state = legacy_sim.state
    sub_id = state.create_subscription(seats=3)["id"]
    seat = state.assign(subscription_id=sub_id, email="lee@example.com")
    state.advance(30 * HOUR)  # its invitation expired 6 h ago
    assert address_of(seat) == (None, "lee@example.com")
    services: WorkerResources = await services_for(legacy_sim, renew_expired_invitations=True)
    await sync_scope(services, kind="subscription", scope_id=sub_id)

    report = await invitations.renew_expired(services)

    assert report.outcomes == {"assigned": 1}
    [fresh] = pending_for(legacy_sim, sub_id, "lee@example.com")
    assert address_of(fresh) == (None, "lee@example.com")
    new_expiry = datetime.fromisoformat(fresh["invitation_token_expires_at"].replace("Z", "+00:00"))
    assert new_expiry > datetime.now(UTC) + timedelta(hours=23)
    [row] = await rows(services, InvitationRenewal)
    assert (row.recipient, row.state, row.new_seat_id) == (
        "lee@example.com",
        "assigned",
        fresh["id"],
    )
    await sync_scope(services, kind="subscription", scope_id=sub_id)
    assert (await invitations.renew_expired(services)).outcomes == {}
    assert len(pending_for(legacy_sim, sub_id, "lee@example.com")) == 1
