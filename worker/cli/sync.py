"""Sync on demand: `resync` one scope (or `--all`) and `verify` the mirror against Polar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from worker.cli.environment import run_async, settings_from_env
from worker.cli.errors import EXIT_DRIFT, EXIT_ERROR, CommandError, UsageError
from worker.cli.output import cell, console, print_table, say, warn

if TYPE_CHECKING:
    from worker.polar.errors import PolarError
    from worker.sync.reconcile import SeatDiff
    from worker.sync.verify import ScopeReport

commands = typer.Typer()


def announce_retry(error: PolarError, attempt: int, delay: float) -> None:
    """Tell the person at the terminal what a retried Polar call is waiting for."""
    from worker.polar.errors import RateLimitedError

    if isinstance(error, RateLimitedError):
        warn(f"rate limited by Polar; waiting {delay:.1f}s")
    else:
        warn(f"{error}; retrying in {delay:.1f}s")


def print_changes(changes: Sequence[SeatDiff]) -> None:
    if not changes:
        say("no changes")
        return
    print_table(
        ("seat", "change", "status", "holder"),
        (
            (
                cell(c.seat_id),
                cell(c.change),
                f"{c.old_status or '-'} -> {c.new_status or '-'}",
                f"{c.old_email or '-'} -> {c.new_email or '-'}",
            )
            for c in changes
        ),
    )


def _resync_one(kind: str, scope_id: str) -> None:
    from worker.process.oneshot import resync_scope

    settings = settings_from_env()
    settings.require_token()
    outcome = run_async(resync_scope(settings, kind, scope_id, on_retry=announce_retry))
    if outcome.status == "gone":
        raise CommandError(
            f"{kind} {scope_id} was not found in Polar (404); its seats stay in the mirror"
        )
    result = outcome.result
    assert result is not None
    say(
        f"{kind} {scope_id}: {result.inserted} inserted, {result.updated} updated, "
        f"{result.unchanged} unchanged, {result.gone} gone "
        f"({result.total_seats} seats, {result.available_seats} available)"
    )
    print_changes(result.changes)


def _resync_all() -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from worker.process.oneshot import resync_everything

    settings = settings_from_env()
    settings.require_token()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("full resync", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = run_async(resync_everything(settings, progress=advance))
    say(
        f"full resync {'(resumed) ' if summary.resumed else ''}#{summary.run_id}: "
        f"{summary.scopes} scopes, {summary.synced} synced, {summary.skipped} skipped "
        f"(synced by webhooks meanwhile), {summary.gone} gone, {summary.failed} failed; "
        f"{summary.api_calls} API calls, {summary.seats_changed} seats changed"
    )
    if summary.failed:
        raise typer.Exit(EXIT_ERROR)


@commands.command()
def resync(
    subscription: Annotated[
        str | None, typer.Option("--subscription", help="Subscription id.")
    ] = None,
    order: Annotated[str | None, typer.Option("--order", help="Order id.")] = None,
    all_scopes: Annotated[
        bool, typer.Option("--all", help="Discover and sync every seat-based scope.")
    ] = False,
) -> None:
    """Sync one subscription or order (or --all) now and print what changed."""
    chosen = sum(x is not None for x in (subscription, order)) + int(all_scopes)
    if chosen != 1:
        raise UsageError("give exactly one of --subscription ID, --order ID or --all")
    if all_scopes:
        _resync_all()
    elif subscription is not None:
        _resync_one("subscription", subscription)
    else:
        assert order is not None
        _resync_one("order", order)


def parse_scope(item: str) -> tuple[str, str]:
    kind, sep, scope_id = item.partition(":")
    if not sep or kind not in ("subscription", "order") or not scope_id:
        raise UsageError(f"--scope must be subscription:ID or order:ID, not {item!r}")
    return kind, scope_id


def print_report(report: ScopeReport) -> None:
    for d in report.differences:
        say(f"{d.kind} {d.scope_id} {d.seat_id or '-'} {d.what}: {d.detail}")


@commands.command()
def verify(
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="subscription:ID or order:ID (repeatable); default all."),
    ] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Fix the drift found.")] = False,
) -> None:
    """Compare the mirror with Polar scope by scope; exit 3 on drift (0 after --repair)."""
    chosen = [parse_scope(item) for item in scope or []]
    settings = settings_from_env()
    settings.require_token()
    from worker.process.oneshot import verify_scopes

    summary = run_async(
        verify_scopes(
            settings, chosen, repair=repair, on_report=print_report, on_retry=announce_retry
        )
    )
    say(
        f"verified {summary.scopes} scopes: {summary.drifted} with drift"
        + (" (repaired)" if repair else "")
    )
    if summary.drifted:
        raise typer.Exit(EXIT_DRIFT)
