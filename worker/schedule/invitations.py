"""Act before invitations lapse: one reminder per invitation, and opt-in renewal.

Polar's resend e-mails the same link again: it neither rotates the token nor extends the
24 h expiry, and after expiry that link is dead. So reminders go out while the link still
works, and an expired invitation can only be renewed by revoking the seat and assigning
the same recipient again.

Every recipient: a seat's `email` is set only in organisations with Polar's member model;
without it `email` is null and the holder's address is the seat's `customer_email`.

Exactly once, the hard way: Polar has no idempotency keys, so each action is claimed in
the database (a unique row per invitation, committed) BEFORE the call. A crash after the
claim and before the record leaves the row in `sending` (or `intent`/`revoked`): the
reminder is then never sent twice, and a renewal resumes from its recorded step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import SQLModel, col

from worker import queue
from worker.models import InvitationReminder, InvitationRenewal, Seat, utcnow
from worker.platform.db import retry_transaction
from worker.polar.errors import InvalidRequestError, PolarError, RateLimitedError
from worker.polar.schemas import SeatAssign
from worker.resources import PolarResources, Resources

log = structlog.get_logger("worker.schedule.invitations")

# A reminder stuck in `sending` this long was interrupted by a crash: we cannot know
# whether Polar sent it, so it is reported as `unknown` and never retried.
STALE_SENDING = timedelta(minutes=10)
RENEWAL_ACTIVE_STATES = ("intent", "revoked", "assigned")


@dataclass
class Planned:
    seat_id: str
    scope_kind: str
    scope_id: str
    recipient: str
    expires_at: datetime


@dataclass
class RunReport:
    planned: list[Planned] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def _scope_of(seat: Seat) -> tuple[str, str]:
    if seat.subscription_id is not None:
        return "subscription", seat.subscription_id
    assert seat.order_id is not None
    return "order", seat.order_id


def _recipient(seat: Seat) -> str | None:
    """Who an invitation of this seat reaches: the member's address when the organisation
    has the member model, else the holder's customer address (there, a live seat has no
    member, so its customer is the holder, not a billing customer)."""
    return seat.email or seat.member_email or seat.customer_email


# A seat nobody can be e-mailed at is never planned; the order matches `_recipient`.
_HAS_RECIPIENT = func.coalesce(
    col(Seat.email), col(Seat.member_email), col(Seat.customer_email)
).is_not(None)


# --- reminders ------------------------------------------------------------------------------


async def plan_reminders(resources: Resources, *, now: datetime) -> list[Planned]:
    """Pending seats whose invitation expires within the window, not yet reminded."""
    window = timedelta(hours=resources.settings.remind_window_hours)
    async with resources.sessions() as session:
        rows = await session.execute(
            select(Seat)
            .where(
                col(Seat.status) == "pending",
                col(Seat.gone_at).is_(None),
                _HAS_RECIPIENT,
                col(Seat.invitation_token_expires_at) > now,
                col(Seat.invitation_token_expires_at) <= now + window,
            )
            .order_by(col(Seat.invitation_token_expires_at))
        )
        candidates = list(rows.scalars())
        reminded = (
            await session.execute(
                select(
                    col(InvitationReminder.seat_id), col(InvitationReminder.invitation_expires_at)
                ).where(col(InvitationReminder.seat_id).in_([s.id for s in candidates]))
            )
            if candidates
            else None
        )
        done = {(r.seat_id, r.invitation_expires_at) for r in reminded} if reminded else set()
    planned: list[Planned] = []
    for seat in candidates:
        recipient = _recipient(seat)
        expires = seat.invitation_token_expires_at
        if recipient is None or expires is None or (seat.id, expires) in done:
            continue
        kind, scope_id = _scope_of(seat)
        planned.append(Planned(seat.id, kind, scope_id, recipient, expires))
    return planned


async def _claim(
    resources: Resources, build: Callable[[AsyncSession], Awaitable[SQLModel]]
) -> int | None:
    """Commit the row that claims an action; None when its unique key is already taken (by
    another worker, or an earlier run), so the action is never done twice."""

    async def work(session: AsyncSession) -> int:
        row = await build(session)
        session.add(row)
        await session.flush()
        row_id = getattr(row, "id", None)
        assert isinstance(row_id, int)
        return row_id

    try:
        return await retry_transaction(resources.sessions, work)
    except IntegrityError:
        return None


async def _claim_reminder(resources: Resources, item: Planned) -> int | None:
    """Insert the reminder row; None when another worker (or an earlier run) has it."""

    async def build(_session: AsyncSession) -> SQLModel:
        return InvitationReminder(
            seat_id=item.seat_id,
            scope_kind=item.scope_kind,
            scope_id=item.scope_id,
            recipient=item.recipient,
            invitation_expires_at=item.expires_at,
            created_at=utcnow(),
            outcome="sending",
        )

    return await _claim(resources, build)


async def _record_reminder(
    resources: Resources, row_id: int, outcome: str, error: str | None
) -> None:
    async def work(session: AsyncSession) -> None:
        row = await session.get(InvitationReminder, row_id)
        if row is not None:
            row.outcome = outcome
            row.error = error
            if outcome == "sent":
                row.sent_at = utcnow()

    await retry_transaction(resources.sessions, work)


async def _forget_claim(resources: Resources, row_id: int) -> None:
    """Only for calls Polar certainly did not process (429): the reminder may go out later."""

    async def work(session: AsyncSession) -> None:
        row = await session.get(InvitationReminder, row_id)
        if row is not None and row.outcome == "sending":
            await session.delete(row)

    await retry_transaction(resources.sessions, work)


async def _expire_interrupted(resources: Resources, now: datetime) -> int:
    async def work(session: AsyncSession) -> int:
        rows = (
            (
                await session.execute(
                    select(InvitationReminder).where(
                        col(InvitationReminder.outcome) == "sending",
                        col(InvitationReminder.created_at) < now - STALE_SENDING,
                    )
                )
            )
            .scalars()
            .all()
        )
        for row in rows:
            row.outcome = "unknown"
            row.error = (
                "interrupted between claim and record; not retried (resend is not idempotent)"
            )
        return len(rows)

    return await retry_transaction(resources.sessions, work)


async def remind_expiring(
    resources: PolarResources, *, dry_run: bool = False, spread: float | None = None
) -> RunReport:
    """Resend each expiring invitation once. `spread` seconds (default from settings)
    spaces a batch out with jitter so a large batch does not burst."""
    now = utcnow()
    report = RunReport()
    await _expire_interrupted(resources, now)
    report.planned = await plan_reminders(resources, now=now)
    if dry_run or not report.planned:
        return report
    polar = resources.polar
    total_spread = resources.settings.remind_spread_seconds if spread is None else spread
    gap = total_spread / max(1, len(report.planned))
    for index, item in enumerate(report.planned):
        if index and gap > 0:
            await asyncio.sleep(gap * random.uniform(0.5, 1.5))
        row_id = await _claim_reminder(resources, item)
        if row_id is None:
            report.count("already_claimed")
            continue
        bound = log.bind(seat_id=item.seat_id, scope_id=item.scope_id, reminder_id=row_id)
        try:
            await polar.resend(item.seat_id, lane="reminder")
        except RateLimitedError:
            await _forget_claim(resources, row_id)  # rejected before processing: safe to retry
            report.count("rate_limited")
            bound.warning("reminder_rate_limited")
            break
        except InvalidRequestError as exc:
            if exc.error == "SeatNotPending":
                await _record_reminder(resources, row_id, "not_pending", str(exc))
                if resources.redis is not None:
                    await queue.request_sync(
                        resources.redis,
                        item.scope_kind,
                        item.scope_id,
                        trigger="reminder",
                        window=queue.SyncWindow.of(resources.settings),
                    )
                report.count("not_pending")
            elif exc.error == "InvalidInvitationToken":
                await _record_reminder(resources, row_id, "invalid_token", str(exc))
                report.count("invalid_token")
            else:
                await _record_reminder(resources, row_id, "failed", str(exc))
                report.count("failed")
            bound.info("reminder_refused", error=exc.error)
            continue
        except PolarError as exc:
            # 5xx or timeout: Polar may have sent it. Never risk a second e-mail.
            await _record_reminder(resources, row_id, "failed", str(exc))
            report.count("failed")
            bound.warning("reminder_failed", error=str(exc))
            continue
        await _record_reminder(resources, row_id, "sent", None)
        report.count("sent")
        bound.info("reminder_sent")
    return report


# --- renewal --------------------------------------------------------------------------------


async def plan_renewals(resources: Resources, *, now: datetime) -> list[Planned]:
    """Pending seats whose invitation has expired, with a recipient and renewals left."""
    limit = resources.settings.renew_max_per_recipient
    async with resources.sessions() as session:
        rows = await session.execute(
            select(Seat).where(
                col(Seat.status) == "pending",
                col(Seat.gone_at).is_(None),
                _HAS_RECIPIENT,
                col(Seat.invitation_token_expires_at) <= now,
            )
        )
        planned: list[Planned] = []
        for seat in rows.scalars():
            recipient = _recipient(seat)
            if recipient is None or seat.invitation_token_expires_at is None:
                continue
            kind, scope_id = _scope_of(seat)
            used = (
                await session.execute(
                    select(func.count())
                    .select_from(InvitationRenewal)
                    .where(
                        col(InvitationRenewal.scope_kind) == kind,
                        col(InvitationRenewal.scope_id) == scope_id,
                        func.lower(col(InvitationRenewal.recipient)) == recipient.lower(),
                        col(InvitationRenewal.state).in_(RENEWAL_ACTIVE_STATES),
                    )
                )
            ).scalar_one()
            if used >= limit:
                continue
            planned.append(
                Planned(seat.id, kind, scope_id, recipient, seat.invitation_token_expires_at)
            )
    return planned


async def _record_intent(resources: Resources, item: Planned) -> int | None:
    async def build(session: AsyncSession) -> SQLModel:
        seat = await session.get(Seat, item.seat_id)
        now = utcnow()
        return InvitationRenewal(
            seat_id=item.seat_id,
            scope_kind=item.scope_kind,
            scope_id=item.scope_id,
            recipient=item.recipient,
            seat_metadata=seat.seat_metadata if seat is not None else None,
            old_expires_at=item.expires_at,
            state="intent",
            created_at=now,
            updated_at=now,
        )

    return await _claim(resources, build)


async def _set_renewal(resources: Resources, row_id: int, **values: object) -> None:
    async def work(session: AsyncSession) -> None:
        row = await session.get(InvitationRenewal, row_id)
        if row is None:
            return
        for key, value in values.items():
            setattr(row, key, value)
        row.updated_at = utcnow()

    await retry_transaction(resources.sessions, work)


async def _advance_renewal(
    resources: PolarResources, row: InvitationRenewal, report: RunReport
) -> None:
    """Carry one renewal from its recorded state to the end, then have the scope synced.

    Whatever the end state (assigned, resumed as already assigned, slot taken, failed, or
    deferred by a Polar error after which the call may still have gone through), Polar's
    seats may have changed: the mirror follows now rather than at the next full resync.
    """
    try:
        await _revoke_then_assign(resources, row, report)
    except PolarError:
        await _request_scope_sync(resources, row)
        raise
    await _request_scope_sync(resources, row)


async def _request_scope_sync(resources: PolarResources, row: InvitationRenewal) -> None:
    if resources.redis is not None:
        await queue.request_sync(
            resources.redis,
            row.scope_kind,
            row.scope_id,
            trigger="renewal",
            window=queue.SyncWindow.of(resources.settings),
        )


async def _revoke_then_assign(
    resources: PolarResources, row: InvitationRenewal, report: RunReport
) -> None:
    assert row.id is not None
    polar = resources.polar
    bound = log.bind(renewal_id=row.id, seat_id=row.seat_id, scope_id=row.scope_id)
    if row.state == "intent":
        await polar.revoke(row.seat_id, lane="reminder")  # idempotent in Polar
        await _set_renewal(resources, row.id, state="revoked")
        row.state = "revoked"
        bound.info("renewal_revoked")
    if row.state != "revoked":
        return
    request = SeatAssign(
        subscription_id=row.scope_id if row.scope_kind == "subscription" else None,
        order_id=row.scope_id if row.scope_kind == "order" else None,
        email=row.recipient,
        metadata=row.seat_metadata,
    )
    try:
        seat = await polar.assign(request, lane="reminder")
    except InvalidRequestError as exc:
        if exc.error == "SeatAlreadyAssigned":
            # The assign went through before a crash: it is done, do not assign again.
            await _set_renewal(resources, row.id, state="assigned", error=None)
            report.count("assigned")
            bound.info("renewal_already_assigned")
        elif exc.error == "SeatNotAvailable":
            await _set_renewal(resources, row.id, state="slot_taken", error=str(exc))
            report.count("slot_taken")
            bound.warning("renewal_slot_taken", recipient_seat=row.seat_id)
        else:
            await _set_renewal(resources, row.id, state="failed", error=str(exc))
            report.count("failed")
            bound.warning("renewal_failed", error=str(exc))
        return
    await _set_renewal(
        resources,
        row.id,
        state="assigned",
        new_seat_id=seat.id,
        new_expires_at=seat.invitation_token_expires_at,
        error=None,
    )
    report.count("assigned")
    bound.info("renewal_assigned", new_seat_id=seat.id)


async def renew_expired(resources: PolarResources, *, dry_run: bool = False) -> RunReport:
    """Resume interrupted renewals, then renew newly expired invitations (opt-in)."""
    report = RunReport()
    now = utcnow()
    report.planned = await plan_renewals(resources, now=now)
    if dry_run:
        return report
    async with resources.sessions() as session:
        unfinished = list(
            (
                await session.execute(
                    select(InvitationRenewal).where(
                        col(InvitationRenewal.state).in_(("intent", "revoked"))
                    )
                )
            ).scalars()
        )
    for row in unfinished:
        try:
            await _advance_renewal(resources, row, report)
        except PolarError as exc:
            report.count("deferred")
            log.warning("renewal_deferred", renewal_id=row.id, error=str(exc))
    for item in report.planned:
        row_id = await _record_intent(resources, item)
        if row_id is None:
            report.count("already_claimed")
            continue
        async with resources.sessions() as session:
            fresh = await session.get(InvitationRenewal, row_id)
        assert fresh is not None
        try:
            await _advance_renewal(resources, fresh, report)
        except PolarError as exc:
            report.count("deferred")  # resumed from its recorded state on the next run
            log.warning("renewal_deferred", renewal_id=row_id, error=str(exc))
    return report
