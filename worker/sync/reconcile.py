"""Authoritative seat list of one scope -> tables, in the caller's transaction (flush only).

Idempotent: the same list applied twice writes nothing the second time. Serialised per
scope by a row lock on seat_scope (SQLite: the whole write transaction is serialised), and
an older fetch never overwrites the state written by a newer one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ARRAY, String, any_, cast, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.intake import inbox
from worker.models import Seat, SeatChange, SeatScope
from worker.platform.db import insert_ignoring_conflict
from worker.polar.schemas import CustomerSeat, SeatsList

# Columns Polar owns; `synced_at` and `gone_at` are ours.
POLAR_COLUMNS = (
    "created_at",
    "modified_at",
    "subscription_id",
    "order_id",
    "status",
    "customer_id",
    "member_id",
    "email",
    "customer_email",
    "invitation_token_expires_at",
    "claimed_at",
    "revoked_at",
    "seat_metadata",
    "member_created_at",
    "member_modified_at",
    "member_customer_id",
    "member_email",
    "member_name",
    "member_external_id",
    "member_role",
)
_LOAD_COLUMNS = ("id", *POLAR_COLUMNS, "gone_at")


@dataclass
class SeatDiff:
    """One observed change, as printed by `seat-sync resync`."""

    seat_id: str
    change: str
    old_status: str | None
    new_status: str | None
    old_email: str | None
    new_email: str | None


@dataclass
class ReconcileResult:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    gone: int = 0
    stale: bool = False
    changes: list[SeatDiff] = field(default_factory=list)
    total_seats: int = 0
    available_seats: int = 0

    @property
    def written(self) -> int:
        return self.inserted + self.updated + self.gone


def seat_row(seat: CustomerSeat) -> dict[str, Any]:
    """Flatten a CustomerSeat into the seat table's Polar-owned columns."""
    member = seat.member
    return {
        "id": seat.id,
        "created_at": seat.created_at,
        "modified_at": seat.modified_at,
        "subscription_id": seat.subscription_id,
        "order_id": seat.order_id,
        "status": seat.status,
        "customer_id": seat.customer_id,
        "member_id": seat.member_id,
        "email": seat.email,
        "customer_email": seat.customer_email,
        "invitation_token_expires_at": seat.invitation_token_expires_at,
        "claimed_at": seat.claimed_at,
        "revoked_at": seat.revoked_at,
        "seat_metadata": seat.seat_metadata,
        "member_created_at": member.created_at if member else None,
        "member_modified_at": member.modified_at if member else None,
        "member_customer_id": member.customer_id if member else None,
        "member_email": member.email if member else None,
        "member_name": member.name if member else None,
        "member_external_id": member.external_id if member else None,
        "member_role": member.role if member else None,
    }


def _scope_column(kind: str) -> Any:
    if kind == "subscription":
        return Seat.subscription_id
    if kind == "order":
        return Seat.order_id
    raise ValueError(f"unknown scope kind {kind!r}")


async def lock_scope(session: AsyncSession, kind: str, scope_id: str, now: datetime) -> SeatScope:
    """Create the scope row if needed and hold its row lock until the transaction ends."""
    await session.execute(
        insert_ignoring_conflict(session, SeatScope).values(
            kind=kind, scope_id=scope_id, created_at=now, consecutive_failures=0
        )
    )
    row = await session.execute(
        select(SeatScope)
        .where(col(SeatScope.kind) == kind, col(SeatScope.scope_id) == scope_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return row.scalar_one()


def _address(row: dict[str, Any]) -> Any:
    # `email` is set only with Polar's member model; without it the holder's address is
    # `customer_email`. A revoked seat has no holder (Polar nulls it), and its
    # customer_email may still name the billing customer, who is not the holder.
    if row.get("status") == "revoked":
        return row.get("email")
    return row.get("email") or row.get("customer_email")


def _holder(row: dict[str, Any]) -> tuple[Any, Any]:
    # Identify the holder by member and address, never by customer_id: Polar flips its
    # meaning (billing customer vs the holder's own) when an organisation adopts members.
    return row.get("member_id"), _address(row)


def _change_row(
    *,
    seat_id: str,
    kind: str,
    scope_id: str,
    now: datetime,
    change: str,
    old: dict[str, Any] | None,
    new: dict[str, Any] | None,
    sync_run_id: int | None,
) -> dict[str, Any]:
    return {
        "seat_id": seat_id,
        "scope_kind": kind,
        "scope_id": scope_id,
        "observed_at": now,
        "change": change,
        "old_status": old["status"] if old else None,
        "new_status": new["status"] if new else None,
        "old_email": _address(old) if old else None,
        "new_email": _address(new) if new else None,
        "old_member_id": old["member_id"] if old else None,
        "new_member_id": new["member_id"] if new else None,
        "old_customer_id": old["customer_id"] if old else None,
        "new_customer_id": new["customer_id"] if new else None,
        "polar_modified_at": (new or old or {}).get("modified_at"),
        "sync_run_id": sync_run_id,
    }


async def _load_existing(
    session: AsyncSession, kind: str, scope_id: str, ids: Iterable[str]
) -> dict[str, dict[str, Any]]:
    columns = [getattr(Seat, c) for c in _LOAD_COLUMNS]
    result = await session.execute(select(*columns).where(_scope_column(kind) == scope_id))
    existing = {row.id: dict(row._mapping) for row in result}
    # A seat id seen under another container would be a Polar bug, but must not crash us.
    strays = [i for i in ids if i not in existing]
    postgres = session.get_bind().dialect.name == "postgresql"
    for start in range(0, len(strays), 500):
        chunk = strays[start : start + 500]
        # One array parameter on PostgreSQL: a 500-parameter IN is re-planned every time.
        where = (
            col(Seat.id) == any_(cast(chunk, ARRAY(String)))
            if postgres
            else col(Seat.id).in_(chunk)
        )
        result = await session.execute(select(*columns).where(where))
        existing.update({row.id: dict(row._mapping) for row in result})
    return existing


async def reconcile_scope(
    session: AsyncSession,
    *,
    kind: str,
    scope_id: str,
    seats: SeatsList,
    fetch_started_at: datetime,
    now: datetime,
    sync_run_id: int | None = None,
) -> ReconcileResult:
    """Make the mirror of one scope equal `seats`, recording every change."""
    result = ReconcileResult(total_seats=seats.total_seats, available_seats=seats.available_seats)
    scope = await lock_scope(session, kind, scope_id, now)
    if scope.last_fetch_started_at is not None and scope.last_fetch_started_at > fetch_started_at:
        result.stale = True  # a newer fetch already landed; ours would move the mirror back
        return result

    fresh = {s.id: seat_row(s) for s in seats.seats}
    existing = await _load_existing(session, kind, scope_id, fresh)
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []

    for seat_id, new in fresh.items():
        old = existing.get(seat_id)
        if old is None:
            inserts.append({**new, "synced_at": now, "gone_at": None})
            changes.append(
                _change_row(
                    seat_id=seat_id,
                    kind=kind,
                    scope_id=scope_id,
                    now=now,
                    change="created",
                    old=None,
                    new=new,
                    sync_run_id=sync_run_id,
                )
            )
            continue
        differs = {c for c in POLAR_COLUMNS if old[c] != new[c]}
        returned = old["gone_at"] is not None
        if not differs and not returned:
            result.unchanged += 1
            continue
        updates.append({**new, "synced_at": now, "gone_at": None})
        if returned:
            change = "returned"
        elif "status" in differs:
            change = "status"
        elif _holder(old) != _holder(new):
            change = "holder"
        else:
            change = ""  # other fields only (names, timestamps, metadata): no history row
        if change:
            changes.append(
                _change_row(
                    seat_id=seat_id,
                    kind=kind,
                    scope_id=scope_id,
                    now=now,
                    change=change,
                    old=old,
                    new=new,
                    sync_run_id=sync_run_id,
                )
            )

    vanished = [
        old
        for seat_id, old in existing.items()
        if seat_id not in fresh
        and old["gone_at"] is None
        and old[_scope_column(kind).key] == scope_id
    ]
    for old in vanished:
        updates.append({"id": old["id"], "gone_at": now, "synced_at": now})
        changes.append(
            _change_row(
                seat_id=old["id"],
                kind=kind,
                scope_id=scope_id,
                now=now,
                change="gone",
                old=old,
                new=old,
                sync_run_id=sync_run_id,
            )
        )

    if inserts:
        await session.execute(insert(Seat).execution_options(render_nulls=True), inserts)
    if updates:
        for group in _group_by_keys(updates):
            await session.execute(update(Seat), group)
    if changes:
        await session.execute(insert(SeatChange).execution_options(render_nulls=True), changes)

    result.inserted = len(inserts)
    result.updated = len(updates) - len(vanished)
    result.gone = len(vanished)
    result.changes = [
        SeatDiff(
            c["seat_id"],
            c["change"],
            c["old_status"],
            c["new_status"],
            c["old_email"],
            c["new_email"],
        )
        for c in changes
    ]

    scope.total_seats = seats.total_seats
    scope.available_seats = seats.available_seats
    scope.last_synced_at = now
    scope.last_attempt_at = now
    scope.last_fetch_started_at = fetch_started_at
    scope.last_error = None
    scope.consecutive_failures = 0
    scope.gone_at = None
    await inbox.mark_scope_synced(
        session,
        kind=kind,
        scope_id=scope_id,
        fetched_after=fetch_started_at,
        now=now,
        sync_run_id=sync_run_id,
    )
    await session.flush()
    return result


def _group_by_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """ORM bulk UPDATE wants every row of one call to have the same keys."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    return list(groups.values())


async def record_failure(
    session: AsyncSession, *, kind: str, scope_id: str, error: str, now: datetime
) -> None:
    scope = await lock_scope(session, kind, scope_id, now)
    scope.last_error = error[:2000]
    scope.last_attempt_at = now
    scope.consecutive_failures += 1
    await session.flush()


async def mark_scope_gone(
    session: AsyncSession,
    *,
    kind: str,
    scope_id: str,
    fetch_started_at: datetime,
    now: datetime,
    sync_run_id: int | None = None,
) -> None:
    """Polar answered 404: keep the seats queryable, remember the scope is gone."""
    scope = await lock_scope(session, kind, scope_id, now)
    if scope.gone_at is None:
        scope.gone_at = now
    scope.last_error = "not found in Polar (404)"
    scope.last_attempt_at = now
    scope.last_fetch_started_at = max(
        fetch_started_at, scope.last_fetch_started_at or fetch_started_at
    )
    await inbox.mark_scope_synced(
        session,
        kind=kind,
        scope_id=scope_id,
        fetched_after=fetch_started_at,
        now=now,
        sync_run_id=sync_run_id,
    )
    await session.flush()
