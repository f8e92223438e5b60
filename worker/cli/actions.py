"""Seat actions written through: `assign`, `revoke`, `resend`. Each calls Polar (the
interactive lane of the shared rate budget when a Redis is reachable), then re-syncs the
seat's subscription or order in this process, so the mirror shows the result when the
command returns, with or without a worker running. Polar's refusals are one line, exit 1."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker.cli.environment import run_async, settings_from_env
from worker.cli.errors import CommandError, UsageError
from worker.cli.output import DocumentFormat, OutputFormat, emit_document, emit_rows, say
from worker.cli.queries import SEAT_COLUMNS, read_settings
from worker.cli.sync import announce_retry

if TYPE_CHECKING:
    from worker.process.oneshot import SeatAction

commands = typer.Typer()

# Polar's error classes for a refused seat call, and what they mean to a person.
REFUSALS = {
    "SeatNotAvailable": "no seat available in {scope}: every seat is pending or claimed",
    "SeatAlreadyAssigned": "{who} already has a seat in {scope}",
    "SeatNotPending": "seat {seat} is not pending: only a pending invitation can be resent",
    "InvalidInvitationToken": "seat {seat} has no invitation to resend (claimed at once, or "
    "no e-mail address)",
}


def refusal(exc: Exception, **context: str) -> CommandError | None:
    """The one line for Polar's refusal of a seat call; None when `exc` is something else."""
    from worker.polar.errors import NotFoundError, PolarError

    if not isinstance(exc, PolarError):
        return None
    if isinstance(exc, NotFoundError):
        what = context.get("missing", "it")
        return CommandError(f"{what} not found in Polar (404 ResourceNotFound)")
    template = REFUSALS.get(exc.error or "")
    if template is None:
        return None  # the app's translation: Polar's own words
    values = {"scope": "", "who": "", "seat": "", **context}
    return CommandError(f"{template.format(**values)} (Polar: {exc.error})")


def _run(action: Any, **context: str) -> SeatAction:
    try:
        result: SeatAction = run_async(action)
    except Exception as exc:
        translated = refusal(exc, **context)
        if translated is None:
            raise
        raise translated from None
    return result


def _report(done: SeatAction, verb: str, fmt: OutputFormat) -> None:
    def as_table() -> None:
        say(f"{verb} seat {done.seat_id} of {done.kind} {done.scope_id}; mirror re-synced")
        if done.seat is not None:
            emit_rows([done.seat], OutputFormat.table, columns=SEAT_COLUMNS, title="")

    emit_document({"seat": done.seat, "sync": done.sync.status}, fmt, as_table=as_table)


def _known_scope(given: str) -> tuple[str, tuple[str, str] | None]:
    """The seat id (a prefix shown by `seats` completed from the mirror) and its scope
    when the mirror has the seat."""
    from worker.platform.migrate import SchemaBehindError
    from worker.query.mirror import NoDatabaseError
    from worker.query.seats import AmbiguousSeatError, seat_scope

    try:
        found = seat_scope(read_settings(), given)
    except AmbiguousSeatError as exc:
        raise UsageError(str(exc)) from None
    except (NoDatabaseError, SchemaBehindError):
        found = None  # a SQLite mirror is created or upgraded by the action itself
    if found is None:
        return given, None
    seat_id, kind, scope_id = found
    return seat_id, (kind, scope_id)


@commands.command()
def assign(
    subscription: Annotated[
        str | None, typer.Option("--subscription", help="Subscription id.")
    ] = None,
    order: Annotated[str | None, typer.Option("--order", help="Order id.")] = None,
    email: Annotated[str, typer.Option("--email", help="Who gets the seat.")] = "",
    metadata: Annotated[
        str | None, typer.Option("--metadata", help='A JSON object, e.g. {"team": "blue"}.')
    ] = None,
    fmt: DocumentFormat = OutputFormat.table,
) -> None:
    """Assign a seat of a subscription or order to an e-mail address (Polar sends the
    invitation), then re-sync it into the mirror."""
    from worker.process.oneshot import assign_seat

    if (subscription is None) == (order is None):
        raise UsageError("give exactly one of --subscription ID or --order ID")
    if not email.strip():
        raise UsageError("give --email E: who gets the seat")
    extra: dict[str, Any] | None = None
    if metadata is not None:
        try:
            extra = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--metadata is not JSON: {exc.msg}") from None
        if not isinstance(extra, dict):
            raise UsageError("--metadata must be a JSON object")
    kind, scope_id = ("subscription", subscription) if subscription else ("order", order or "")
    settings = settings_from_env()
    settings.require_token()
    done = _run(
        assign_seat(
            settings,
            kind=kind,
            scope_id=scope_id,
            email=email.strip(),
            metadata=extra,
            on_retry=announce_retry,
        ),
        scope=f"{kind} {scope_id}",
        who=email.strip(),
        missing=f"{kind} {scope_id}",
    )
    _report(done, "assigned", fmt)


@commands.command()
def revoke(
    seat_id: Annotated[str, typer.Argument(help="The seat id (or its first characters).")],
    fmt: DocumentFormat = OutputFormat.table,
) -> None:
    """Revoke a seat (its holder loses access), then re-sync it into the mirror."""
    from worker.process.oneshot import revoke_seat

    _act_on_seat(seat_id, revoke_seat, "revoked", fmt)


@commands.command()
def resend(
    seat_id: Annotated[str, typer.Argument(help="The seat id (or its first characters).")],
    fmt: DocumentFormat = OutputFormat.table,
) -> None:
    """E-mail a pending invitation again (the same link; its expiry does not move)."""
    from worker.process.oneshot import resend_invitation

    _act_on_seat(seat_id, resend_invitation, "invitation resent for", fmt)


def _act_on_seat(seat_id: str, action: Any, verb: str, fmt: OutputFormat) -> None:
    """Resolve a (short) seat id against the mirror, run one seat action, report it."""
    settings = settings_from_env()
    settings.require_token()
    full_id, scope = _known_scope(seat_id)
    done = _run(
        action(settings, full_id, known_scope=scope, on_retry=announce_retry),
        seat=full_id,
        missing=f"seat {full_id}",
    )
    _report(done, verb, fmt)
