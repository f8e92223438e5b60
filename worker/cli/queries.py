"""The questions people ask the mirror: `seats`, `seat`, `scopes`, `history` and `status`.

Each command parses its options, asks one function of `worker.query`, and prints; the
mirror is opened read-only.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from worker.cli.environment import settings_from_env
from worker.cli.errors import CommandError, UsageError
from worker.cli.output import (
    DocumentFormat,
    Format,
    OutputFormat,
    cell,
    emit_document,
    emit_rows,
    out,
)

commands = typer.Typer()

SEAT_COLUMNS = (
    "id",
    "status",
    "email",
    "subscription_id",
    "order_id",
    "member_id",
    "invitation_token_expires_at",
    "claimed_at",
    "revoked_at",
)
CHANGE_COLUMNS = (
    "observed_at",
    "seat_id",
    "change",
    "old_status",
    "new_status",
    "old_email",
    "new_email",
    "scope_kind",
    "scope_id",
)
SCOPE_COLUMNS = (
    "kind",
    "scope_id",
    "total_seats",
    "available_seats",
    "pending",
    "claimed",
    "last_synced_at",
    "last_error",
)
LOST_COLUMNS = ("lost_at", "email", "was", "now", "seat_id", "scope_id", "replaced_by")
HELD_COLUMNS = ("seat_id", "scope_kind", "scope_id", "started_at", "ended_at", "status")
SEAT_STATUSES = ("pending", "claimed", "revoked")


def parse_duration(text: str) -> timedelta:
    """'6h', '90m', '7d', '30s', '2w' or a plain number of hours."""
    raw = text.strip().lower()
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    try:
        if raw and raw[-1] in units:
            return timedelta(**{units[raw[-1]]: float(raw[:-1])})
        return timedelta(hours=float(raw))
    except ValueError:
        raise UsageError(f"not a duration: {text!r} (use e.g. 6h, 90m, 7d)") from None


@commands.command()
def seats(
    subscription: Annotated[str | None, typer.Option("--subscription")] = None,
    order: Annotated[str | None, typer.Option("--order")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="pending, claimed or revoked.")
    ] = None,
    email: Annotated[str | None, typer.Option("--email", help="Case-insensitive.")] = None,
    member: Annotated[str | None, typer.Option("--member", help="Member id.")] = None,
    customer: Annotated[str | None, typer.Option("--customer", help="Customer id.")] = None,
    expiring_within: Annotated[
        str | None,
        typer.Option("--expiring-within", help="Pending invitations expiring within e.g. 6h."),
    ] = None,
    expired: Annotated[
        bool, typer.Option("--expired", help="Pending invitations already expired.")
    ] = False,
    include_gone: Annotated[
        bool, typer.Option("--include-gone", help="Also seats Polar no longer lists.")
    ] = False,
    fmt: Format = OutputFormat.table,
) -> None:
    """List mirrored seats (JSON: every CustomerSeat key)."""
    from worker.query.seats import SeatFilter, find_seats

    if status is not None and status not in SEAT_STATUSES:
        raise UsageError("--status must be pending, claimed or revoked")
    wanted = SeatFilter(
        subscription_id=subscription,
        order_id=order,
        status=status,
        email=email,
        member_id=member,
        customer_id=customer,
        expiring_within=parse_duration(expiring_within) if expiring_within is not None else None,
        expired=expired,
        include_gone=include_gone,
    )
    rows = asyncio.run(find_seats(settings_from_env(), wanted))
    emit_rows(rows, fmt, columns=SEAT_COLUMNS, title=f"{len(rows)} seats")


@commands.command("seat")
def seat(
    seat_id: Annotated[str, typer.Argument(help="The seat id.")],
    fmt: DocumentFormat = OutputFormat.table,
) -> None:
    """One seat with its full change history."""
    from worker.query.seats import seat_detail

    found = asyncio.run(seat_detail(settings_from_env(), seat_id))
    if found is None:
        raise CommandError(f"no seat {seat_id} in the mirror")

    def as_table() -> None:
        detail = Table("key", "value", title=f"seat {seat_id}")
        for key, value in found.seat.items():
            detail.add_row(key, cell(value))
        out.print(detail)
        emit_rows(found.history, OutputFormat.table, columns=CHANGE_COLUMNS, title="history")

    emit_document({"seat": found.seat, "history": found.history}, fmt, as_table=as_table)


@commands.command()
def scopes(fmt: Format = OutputFormat.table) -> None:
    """Every mirrored subscription and order: seats, pending, claimed, last sync, last error."""
    from worker.query.scopes import list_scopes

    rows = asyncio.run(list_scopes(settings_from_env()))
    emit_rows(rows, fmt, columns=SCOPE_COLUMNS, title=f"{len(rows)} scopes")


@commands.command()
def history(
    email: Annotated[
        str | None, typer.Option("--email", help="Every seat this person held.")
    ] = None,
    lost: Annotated[
        bool, typer.Option("--lost", help="Who lost access (revoked or replaced).")
    ] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Only changes within e.g. 7d.")
    ] = None,
    fmt: Format = OutputFormat.table,
) -> None:
    """Seat history from seat_change: a person's seats (--email) or who lost access (--lost)."""
    from worker.query.history import lost_access, seats_held

    if email is None and not lost:
        raise UsageError("give --email E, or --lost (with --since 7d for this week)")
    within = parse_duration(since) if since is not None else None
    settings = settings_from_env()
    if lost:
        rows = asyncio.run(lost_access(settings, within=within))
        emit_rows(rows, fmt, columns=LOST_COLUMNS, title=f"{len(rows)} lost access")
    else:
        assert email is not None
        rows = asyncio.run(seats_held(settings, email, within=within))
        emit_rows(rows, fmt, columns=HELD_COLUMNS, title=f"seats held by {email}")


def print_status(report: dict[str, Any]) -> None:
    """The status report for a person: problems first, then the tables, then the figures."""
    problem = report["polar"]["problem"]
    if problem:
        out.print(problem, style="bold red", markup=False, highlight=False, soft_wrap=True)
    passes = Table(
        "pass",
        "started",
        "finished",
        "status",
        "scopes",
        "API calls",
        "changed",
        "errors",
        title="Full resyncs",
    )
    for p in report["full_resyncs"]:
        passes.add_row(
            cell(p["id"]),
            cell(p["started_at"][:19]),
            cell((p["finished_at"] or "running")[:19]),
            cell(p["status"]),
            cell(p["scopes"]),
            cell(p["api_calls"]),
            cell(p["seats_changed"]),
            cell(p["errors"]),
        )
    out.print(passes)
    if report["failing_scopes"]:
        failing = Table("scope", "failures", "last error", title="Failing scopes")
        for f in report["failing_scopes"]:
            failing.add_row(
                cell(f"{f['kind']} {f['scope_id']}"),
                cell(f["consecutive_failures"]),
                cell(f["last_error"]),
            )
        out.print(failing)
    budget = report["rate_budget"]
    depth = report["queue_depth"]
    used = f"{budget['used']}/{budget['limit']} in the last window" if budget else "unknown"
    out.print(
        f"deliveries not yet processed: {report['deliveries_pending']} "
        f"(oldest {report['oldest_pending_delivery_age_s']} s)\n"
        f"queue depth: {depth if depth is not None else 'Redis not reachable'}\n"
        f"rate budget: {used}\n"
        f"reminders: {report['reminders'] or 'none'}; renewals: {report['renewals'] or 'none'}",
        markup=False,
        highlight=False,
    )


@commands.command()
def status(fmt: DocumentFormat = OutputFormat.table) -> None:
    """Last full resyncs, failing scopes, unprocessed deliveries, queue and rate budget."""
    from worker.query.status import status_report

    report = asyncio.run(status_report(settings_from_env()))
    emit_document(report, fmt, as_table=lambda: print_status(report))
