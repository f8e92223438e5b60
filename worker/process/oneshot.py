"""One-shot work a person starts (`resync`, `verify`, `remind`, `renew`, `assign`, `revoke`,
`resend`, `prune`): open the resources, do the one piece of work through Polar's shared rate
budget (interactive lane), close.

A person is waiting, so a call that meets a rate limit or a transient failure is retried
here, under the one retry policy (`worker.polar.retry`); `on_retry` hears of each wait.
Calls that are not idempotent (assign, resend) are retried only after a 429, when Polar
certainly did nothing: after a timeout or a 5xx, Polar may have acted, and the mirror,
re-synced at once, tells.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from worker.config import Settings
from worker.models import utcnow
from worker.platform.migrate import check_schema
from worker.polar.errors import PolarError, TransientError
from worker.polar.retry import OnRetry, call_with_retries
from worker.polar.schemas import CustomerSeat, SeatAssign
from worker.process.startup import operating, prepare_database
from worker.query.seats import mirrored_seat
from worker.resources import PolarResources, Resources
from worker.schedule.invitations import RunReport, remind_expiring, renew_expired
from worker.schedule.retention import PruneReport, Retention, prune, would_prune
from worker.sync.resync import PassSummary, Progress, resync_all
from worker.sync.scope import SyncOutcome, sync_scope
from worker.sync.verify import ScopeReport, mirrored_scopes, verify_scope

T = TypeVar("T")


async def resync_scope(
    settings: Settings, kind: str, scope_id: str, *, on_retry: OnRetry | None = None
) -> SyncOutcome:
    """Sync one subscription or order now; the outcome says what changed (or that it is gone)."""
    async with operating(settings) as resources:
        return await call_with_retries(
            lambda: sync_scope(
                resources, kind=kind, scope_id=scope_id, trigger="cli", lane="interactive"
            ),
            on_retry=on_retry,
        )


async def resync_everything(settings: Settings, *, progress: Progress) -> PassSummary:
    """A full pass now (resuming an interrupted one); PassBusyError while another runs."""
    async with operating(settings) as resources:
        summary = await resync_all(resources, trigger="cli", force=True, progress=progress)
    assert summary is not None  # forced: a pass is always due
    return summary


@dataclass(frozen=True)
class VerifySummary:
    scopes: int
    drifted: int
    """Scopes that differ from Polar and were not repaired."""


async def verify_scopes(
    settings: Settings,
    scopes: Sequence[tuple[str, str]],
    *,
    repair: bool,
    on_report: Callable[[ScopeReport], None],
    on_retry: OnRetry | None = None,
) -> VerifySummary:
    """Compare each (kind, id) in `scopes` (default: every mirrored scope) with Polar,
    reporting each scope as it is checked; repair the drift found when `repair`."""
    drifted = 0
    async with operating(settings) as resources:
        targets = list(scopes) or await mirrored_scopes(resources)
        for kind, scope_id in targets:
            report = await call_with_retries(
                functools.partial(verify_scope, resources, kind, scope_id, repair=repair),
                on_retry=on_retry,
            )
            on_report(report)
            if report.differences and not report.repaired:
                drifted += 1
    return VerifySummary(scopes=len(targets), drifted=drifted)


async def remind(settings: Settings, *, dry_run: bool) -> RunReport:
    """Resend the invitations that expire soon, once each (or only list them)."""
    async with operating(settings) as resources:
        return await remind_expiring(resources, dry_run=dry_run, spread=0.0)


async def renew(settings: Settings, *, dry_run: bool) -> RunReport:
    """Renew expired invitations: revoke and assign the same recipient again (or only list)."""
    async with operating(settings) as resources:
        return await renew_expired(resources, dry_run=dry_run)


# ---------------------------------------------------------------------- seat actions


class OutcomeUnknownError(PolarError):
    """Polar did not answer a call that is not safe to repeat (timeout, 5xx, network): it
    may or may not have acted. The scope was re-synced, so the mirror tells."""


@dataclass(frozen=True)
class SeatAction:
    """What an assign, revoke or resend did, and the seat as the mirror now shows it."""

    seat_id: str
    kind: str
    scope_id: str
    seat: dict[str, Any] | None
    """The mirrored seat after the re-sync (a CustomerSeat object)."""
    sync: SyncOutcome


async def _once(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, with a failure after which Polar may have acted made final (not retried)."""
    try:
        return await call()
    except TransientError as exc:
        raise OutcomeUnknownError(
            f"{exc}: Polar may or may not have done it; the mirror was re-synced, so "
            "`seat-sync seats` shows the outcome"
        ) from None


def _scope_of(seat: CustomerSeat) -> tuple[str, str]:
    if seat.subscription_id is not None:
        return "subscription", seat.subscription_id
    assert seat.order_id is not None  # Polar sets exactly one
    return "order", seat.order_id


async def _resync(
    resources: PolarResources, kind: str, scope_id: str, on_retry: OnRetry | None
) -> SyncOutcome:
    return await call_with_retries(
        lambda: sync_scope(
            resources, kind=kind, scope_id=scope_id, trigger="cli", lane="interactive"
        ),
        on_retry=on_retry,
    )


async def _act(
    resources: PolarResources,
    call: Callable[[], Awaitable[CustomerSeat]],
    *,
    known_scope: tuple[str, str] | None,
    on_retry: OnRetry | None,
) -> SeatAction:
    """Make the call; then re-sync the seat's scope in this process, so that the mirror
    shows the result when the command returns (no worker needed). When Polar did not
    answer, the scope known beforehand (if any) is re-synced before the error is raised."""
    try:
        seat = await call_with_retries(call, on_retry=on_retry)
    except OutcomeUnknownError:
        if known_scope is not None:
            await _resync(resources, *known_scope, on_retry)
        raise
    kind, scope_id = _scope_of(seat)
    outcome = await _resync(resources, kind, scope_id, on_retry)
    async with resources.sessions() as session:
        mirrored = await mirrored_seat(session, seat.id)
    return SeatAction(seat.id, kind, scope_id, mirrored, outcome)


async def assign_seat(
    settings: Settings,
    *,
    kind: str,
    scope_id: str,
    email: str,
    metadata: dict[str, Any] | None = None,
    on_retry: OnRetry | None = None,
) -> SeatAction:
    """Assign a seat of the subscription or order to `email` (Polar e-mails an invitation)."""
    request = SeatAssign(
        subscription_id=scope_id if kind == "subscription" else None,
        order_id=scope_id if kind == "order" else None,
        email=email,
        metadata=metadata,
    )
    async with operating(settings) as resources:
        polar = resources.polar
        return await _act(
            resources,
            lambda: _once(lambda: polar.assign(request, lane="interactive")),
            known_scope=(kind, scope_id),
            on_retry=on_retry,
        )


async def revoke_seat(
    settings: Settings,
    seat_id: str,
    *,
    known_scope: tuple[str, str] | None,
    on_retry: OnRetry | None = None,
) -> SeatAction:
    """Revoke a seat (idempotent in Polar: retried like a read)."""
    async with operating(settings) as resources:
        polar = resources.polar
        return await _act(
            resources,
            lambda: polar.revoke(seat_id, lane="interactive"),
            known_scope=known_scope,
            on_retry=on_retry,
        )


async def resend_invitation(
    settings: Settings,
    seat_id: str,
    *,
    known_scope: tuple[str, str] | None,
    on_retry: OnRetry | None = None,
) -> SeatAction:
    """E-mail a pending seat's invitation again (the same link: Polar neither rotates the
    token nor extends its expiry)."""
    async with operating(settings) as resources:
        polar = resources.polar
        return await _act(
            resources,
            lambda: _once(lambda: polar.resend(seat_id, lane="interactive")),
            known_scope=known_scope,
            on_retry=on_retry,
        )


# ---------------------------------------------------------------------- retention


async def prune_now(
    settings: Settings, *, dry_run: bool, now: datetime | None = None
) -> PruneReport:
    """`seat-sync prune`: delete what retention lets go now (or count it, in a dry run).
    Needs only the database: no Polar token, no Redis."""
    await prepare_database(settings)
    resources = await Resources.create(settings)
    try:
        await check_schema(resources.engine)
        retention = Retention.of(settings)
        moment = now or utcnow()
        if dry_run:
            return await would_prune(resources.sessions, retention, now=moment)
        return await prune(resources.sessions, retention, now=moment)
    finally:
        await resources.aclose()
