"""One-shot work a person starts (`resync`, `verify`, `remind`, `renew`): open the resources,
do the one piece of work through Polar's shared rate budget (interactive lane), close.

A person is waiting, so a call that meets a rate limit or a transient failure is retried
here, under the one retry policy (`worker.polar.retry`); `on_retry` hears of each wait.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.config import Settings
from worker.polar.retry import OnRetry, call_with_retries
from worker.process.startup import operating
from worker.schedule.invitations import RunReport, remind_expiring, renew_expired
from worker.sync.resync import PassSummary, Progress, resync_all
from worker.sync.scope import SyncOutcome, sync_scope
from worker.sync.verify import ScopeReport, mirrored_scopes, verify_scope


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
