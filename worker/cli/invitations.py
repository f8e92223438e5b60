"""Invitation upkeep on demand: `remind` (resend expiring invitations) and `renew` (expired)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.environment import run_async, settings_from_env
from worker.cli.errors import UsageError
from worker.cli.output import cell, print_table, say

if TYPE_CHECKING:
    from worker.schedule.invitations import Planned, RunReport

commands = typer.Typer()


def print_plan(title: str, planned: Sequence[Planned]) -> None:
    print_table(
        ("seat", "scope", "recipient", "invitation expires"),
        (
            (
                cell(item.seat_id),
                cell(f"{item.scope_kind} {item.scope_id}"),
                cell(item.recipient),
                cell(item.expires_at),
            )
            for item in planned
        ),
        title=title,
    )


def print_report(report: RunReport, *, title: str, dry_run: bool) -> None:
    print_plan(title, report.planned)
    if not dry_run:
        say(f"outcomes: {report.outcomes or 'none'}")


@commands.command()
def remind(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, do not send.")] = False,
) -> None:
    """Resend invitations that expire within REMIND_WINDOW_HOURS, once per invitation."""
    settings = settings_from_env()
    settings.require_token()
    from worker.process.oneshot import remind as remind_now

    report = run_async(remind_now(settings, dry_run=dry_run))
    verb = "would remind" if dry_run else "reminders"
    print_report(report, title=f"{len(report.planned)} invitations {verb}", dry_run=dry_run)


@commands.command()
def renew(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, do not act.")] = False,
) -> None:
    """Renew expired invitations (revoke + assign the same recipient again)."""
    settings = settings_from_env()
    settings.require_token()
    if not dry_run and not settings.renew_expired_invitations:
        raise UsageError("renewal is off: set RENEW_EXPIRED_INVITATIONS=true (or use --dry-run)")
    from worker.process.oneshot import renew as renew_now

    report = run_async(renew_now(settings, dry_run=dry_run))
    verb = "would renew" if dry_run else "renewals"
    print_report(report, title=f"{len(report.planned)} expired invitations {verb}", dry_run=dry_run)
