"""`seat-sync prune`: delete what retention lets go now (the worker does it daily)."""

from __future__ import annotations

from typing import Annotated

import typer

from worker.cli.environment import run_async, settings_from_env
from worker.cli.output import print_table, say

commands = typer.Typer()


@commands.command()
def prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete processed webhook deliveries older than WEBHOOK_RETENTION_DAYS, finished sync
    runs older than SYNC_RUN_RETENTION_DAYS, and seat changes older than
    SEAT_CHANGE_RETENTION_DAYS when set; in small batches."""
    from worker.process.oneshot import prune_now

    settings = settings_from_env()
    report = run_async(prune_now(settings, dry_run=dry_run))
    print_table(
        ("table", "would delete" if dry_run else "deleted"),
        ((table, str(n)) for table, n in report.rows.items()),
    )
    if settings.seat_change_retention_days is None:
        say("seat_change: kept (SEAT_CHANGE_RETENTION_DAYS is not set)")
