"""The questions people ask the mirror: `seats`, `seat`, `scopes`, `history`, `status`, and
the `changes` feed.

Each command parses its options, asks one function of `worker.query`, and prints; the
mirror is opened read-only. These commands load only what a read needs (see
`worker.query.environment` and `worker.query.mirror`): they answer in tens of milliseconds.
"""

from __future__ import annotations

import signal
import time
from datetime import timedelta
from types import FrameType
from typing import Annotated, Any

import typer

from worker.cli.errors import CommandError, UsageError
from worker.cli.output import (
    Columns,
    DocumentFormat,
    Format,
    OutputFormat,
    RowStream,
    cell,
    chosen_columns,
    emit_document,
    emit_rows,
    print_table,
    say,
)

commands = typer.Typer()

# What a person reads first; --columns picks others, JSON/NDJSON/CSV carry every key.
SEAT_COLUMNS = ("email", "status", "scope", "claimed", "expires", "seat")
CHANGE_COLUMNS = ("id", "observed_at", "seat", "change", "status", "holder")
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
LOST_COLUMNS = ("lost_at", "email", "was", "now", "seat", "scope", "replaced_by")
HELD_COLUMNS = ("seat", "scope", "started_at", "ended_at", "status")
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


def read_settings() -> Any:
    """The few settings a read needs (a bad one: ConfigError naming it, exit 2)."""
    from worker.query.environment import read_settings as light

    return light()


@commands.command()
def seats(
    subscription: Annotated[str | None, typer.Option("--subscription")] = None,
    order: Annotated[str | None, typer.Option("--order")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="pending, claimed or revoked.")
    ] = None,
    email: Annotated[
        str | None,
        typer.Option(
            "--email",
            help="The seat's address, case-insensitive (email, or customer_email without "
            "the member model).",
        ),
    ] = None,
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
    columns: Columns = None,
) -> None:
    """List mirrored seats (JSON: every CustomerSeat key)."""
    from worker.query.seats import SeatFilter, find_seats

    if status is not None and status not in SEAT_STATUSES:
        raise UsageError("--status must be pending, claimed or revoked")
    shown = chosen_columns(columns, SEAT_COLUMNS)
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
    rows = find_seats(read_settings(), wanted)
    emit_rows(rows, fmt, columns=shown, title=f"{len(rows)} seats")


@commands.command("seat")
def seat(
    seat_id: Annotated[
        str, typer.Argument(help="The seat id, or its first characters (as `seats` shows).")
    ],
    fmt: DocumentFormat = OutputFormat.table,
) -> None:
    """One seat with its full change history."""
    from worker.query.seats import AmbiguousSeatError, seat_detail

    try:
        found = seat_detail(read_settings(), seat_id)
    except AmbiguousSeatError as exc:
        raise UsageError(str(exc)) from None
    if found is None:
        raise CommandError(f"no seat {seat_id} in the mirror")

    def as_table() -> None:
        print_table(
            ("key", "value"),
            ((key, cell(value)) for key, value in found.seat.items()),
            title=f"seat {found.seat['id']}",
        )
        say("")
        emit_rows(found.history, OutputFormat.table, columns=CHANGE_COLUMNS, title="history")

    emit_document({"seat": found.seat, "history": found.history}, fmt, as_table=as_table)


@commands.command()
def scopes(fmt: Format = OutputFormat.table, columns: Columns = None) -> None:
    """Every mirrored subscription and order: seats, pending, claimed, last sync, last error."""
    from worker.query.scopes import list_scopes

    shown = chosen_columns(columns, SCOPE_COLUMNS)
    rows = list_scopes(read_settings())
    emit_rows(rows, fmt, columns=shown, title=f"{len(rows)} scopes")


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
    columns: Columns = None,
) -> None:
    """Seat history from seat_change: a person's seats (--email) or who lost access (--lost)."""
    from worker.query.history import lost_access, seats_held

    if email is None and not lost:
        raise UsageError("give --email E, or --lost (with --since 7d for this week)")
    within = parse_duration(since) if since is not None else None
    settings = read_settings()
    if lost:
        rows = lost_access(settings, within=within)
        shown = chosen_columns(columns, LOST_COLUMNS)
        emit_rows(rows, fmt, columns=shown, title=f"{len(rows)} lost access")
    else:
        assert email is not None
        rows = seats_held(settings, email, within=within)
        shown = chosen_columns(columns, HELD_COLUMNS)
        emit_rows(rows, fmt, columns=shown, title=f"seats held by {email}")


def print_status(report: dict[str, Any]) -> None:
    """The status report for a person: problems first, then the tables, then the figures."""
    problem = report["polar"]["problem"]
    if problem:
        say(problem)
        say("")
    print_table(
        ("pass", "started", "finished", "status", "scopes", "API calls", "changed", "errors"),
        (
            (
                cell(p["id"]),
                cell(p["started_at"]),
                cell(p["finished_at"]) or "running",
                cell(p["status"]),
                cell(p["scopes"]),
                cell(p["api_calls"]),
                cell(p["seats_changed"]),
                cell(p["errors"]),
            )
            for p in report["full_resyncs"]
        ),
        title="Full resyncs" if report["full_resyncs"] else "Full resyncs: none yet",
    )
    if report["failing_scopes"]:
        say("")
        print_table(
            ("scope", "failures", "last error"),
            (
                (
                    f"{f['kind']} {f['scope_id']}",
                    cell(f["consecutive_failures"]),
                    cell(f["last_error"]),
                )
                for f in report["failing_scopes"]
            ),
            title="Failing scopes",
        )
    pending = report["deliveries_pending"]
    oldest = report["oldest_pending_delivery_age_s"]
    backlog = f"{pending} (oldest {oldest:g} s ago)" if pending and oldest is not None else "0"
    budget = report["rate_budget"]
    depth = report["queue_depth"]
    used = f"{budget['used']}/{budget['limit']} in the last window" if budget else "unknown"
    say(
        f"\ndeliveries not yet processed: {backlog}\n"
        f"queue depth: {depth if depth is not None else 'unknown (no Redis reachable)'}\n"
        f"rate budget: {used}\n"
        f"reminders: {_tally(report['reminders'])}; renewals: {_tally(report['renewals'])}"
    )


def _tally(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "none"


@commands.command()
def status(fmt: DocumentFormat = OutputFormat.table) -> None:
    """Last full resyncs, failing scopes, unprocessed deliveries, queue and rate budget."""
    from worker.query.status import status_report

    report = status_report(read_settings())
    emit_document(report, fmt, as_table=lambda: print_status(report))


class _StopFollowingError(Exception):
    """SIGINT or SIGTERM while following the feed: finish the output and exit 0."""


class _Interruption:
    """SIGINT or SIGTERM while following: noted at once, acted on only where nothing is in
    flight. Raising from the handler in the middle of a query left the connection broken,
    and closing it then failed the command (exit 1 instead of 0)."""

    def __init__(self) -> None:
        self.requested = False
        self._sleeping = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self._sleeping:
            raise _StopFollowingError

    def sleep(self, seconds: float) -> None:
        """Sleep, unless interrupted before or during it (then raise)."""
        if self.requested:
            raise _StopFollowingError
        self._sleeping = True
        try:
            time.sleep(seconds)
        finally:
            self._sleeping = False


@commands.command()
def changes(
    after: Annotated[
        int,
        typer.Option("--after", help="Only rows whose id is above this (the last id you handled)."),
    ] = 0,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new rows until interrupted.")
    ] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="At most this many rows.")
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="With --follow: seconds between polls.")
    ] = 1.0,
    fmt: Format = OutputFormat.table,
    columns: Columns = None,
) -> None:
    """The change feed: seat_change rows in id order, each with its id (the cursor to pass
    to --after next time). No row is ever skipped or repeated."""
    from worker.query.changes import feed
    from worker.query.seats import CHANGE_KEYS

    shown = chosen_columns(columns, CHANGE_COLUMNS)
    settings = read_settings()
    if not follow:
        found = list(feed(settings, after, follow=False, limit=limit, wait=lambda: None))
        title = f"{len(found)} changes after id {after}"
        emit_rows(found, fmt, columns=shown, title=title, keys=CHANGE_KEYS)
        return
    stream = RowStream(fmt, shown, CHANGE_KEYS)
    # Interrupting --follow is how it ends: stop between rows or while waiting for new
    # ones (never inside a query), close the output, exit 0.
    interruption = _Interruption()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interruption.handle)

    def wait() -> None:
        stream.flush()
        interruption.sleep(interval)

    rows = feed(settings, after, follow=True, limit=limit, wait=wait)
    stream.start()
    try:
        for row in rows:
            stream.write(row)
            stream.flush()
            if interruption.requested:
                break
    except _StopFollowingError:
        pass
    finally:
        rows.close()
    stream.close()
