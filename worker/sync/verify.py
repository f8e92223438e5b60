"""Prove the mirror right: compare each scope with Polar, report every difference, repair."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.models import Seat, SeatScope, utcnow
from worker.platform.db import retry_transaction
from worker.polar.errors import NotFoundError
from worker.polar.schemas import SeatsList
from worker.resources import PolarResources, Resources
from worker.sync.reconcile import POLAR_COLUMNS, reconcile_scope, seat_row


@dataclass
class Difference:
    kind: str
    scope_id: str
    seat_id: str | None
    what: str  # missing | extra | field | scope
    detail: str


@dataclass
class ScopeReport:
    kind: str
    scope_id: str
    differences: list[Difference] = field(default_factory=list)
    repaired: bool = False


async def mirrored_scopes(resources: Resources) -> list[tuple[str, str]]:
    async with resources.sessions() as session:
        rows = await session.execute(
            select(col(SeatScope.kind), col(SeatScope.scope_id))
            .where(col(SeatScope.gone_at).is_(None))
            .order_by(col(SeatScope.kind), col(SeatScope.scope_id))
        )
        return [(r[0], r[1]) for r in rows]


def _fmt(value: Any) -> str:
    return "null" if value is None else str(value)


def compare(
    kind: str, scope_id: str, polar: SeatsList, mirror: list[Seat], scope: SeatScope | None
) -> list[Difference]:
    """Every way the mirror of one scope differs from Polar's authoritative list."""
    diffs: list[Difference] = []
    mine = {s.id: s for s in mirror if s.gone_at is None}
    theirs = {s.id: seat_row(s) for s in polar.seats}
    for seat_id, row in theirs.items():
        ours = mine.get(seat_id)
        if ours is None:
            diffs.append(
                Difference(
                    kind,
                    scope_id,
                    seat_id,
                    "missing",
                    f"{row['status']} {row['email'] or ''}".strip(),
                )
            )
            continue
        for column in POLAR_COLUMNS:
            if getattr(ours, column) != row[column]:
                diffs.append(
                    Difference(
                        kind,
                        scope_id,
                        seat_id,
                        "field",
                        f"{column}: mirror {_fmt(getattr(ours, column))} "
                        f"!= polar {_fmt(row[column])}",
                    )
                )
    for seat_id, ours in mine.items():
        if seat_id not in theirs:
            diffs.append(
                Difference(
                    kind, scope_id, seat_id, "extra", f"{ours.status} {ours.email or ''}".strip()
                )
            )
    if scope is None or (scope.total_seats, scope.available_seats) != (
        polar.total_seats,
        polar.available_seats,
    ):
        have = "none" if scope is None else f"{scope.total_seats}/{scope.available_seats}"
        diffs.append(
            Difference(
                kind,
                scope_id,
                None,
                "scope",
                f"total/available: mirror {have} "
                f"!= polar {polar.total_seats}/{polar.available_seats}",
            )
        )
    return diffs


async def verify_scope(
    resources: PolarResources, kind: str, scope_id: str, *, repair: bool
) -> ScopeReport:
    polar = resources.polar
    report = ScopeReport(kind, scope_id)
    sent: list[datetime] = []
    try:
        listing = await polar.list_scope_seats(kind, scope_id, lane="interactive", sent_at=sent)
    except NotFoundError:
        report.differences.append(
            Difference(kind, scope_id, None, "scope", "not found in Polar (404)")
        )
        return report
    column = Seat.subscription_id if kind == "subscription" else Seat.order_id
    async with resources.sessions() as session:
        mirror = list(
            (await session.execute(select(Seat).where(col(column) == scope_id))).scalars()
        )
        scope = await session.get(SeatScope, (kind, scope_id))
    report.differences = compare(kind, scope_id, listing, mirror, scope)
    if repair and report.differences:

        async def work(session: AsyncSession) -> None:
            await reconcile_scope(
                session,
                kind=kind,
                scope_id=scope_id,
                seats=listing,
                fetch_started_at=sent[-1],
                now=utcnow(),
                # The difference was found row by row; a digest may not know of it (a row
                # changed with the guard trigger off, or its digest edited too).
                trust_digests=False,
            )

        await retry_transaction(resources.sessions, work)
        report.repaired = True
    return report
