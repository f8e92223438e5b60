"""Durable webhook deliveries: dedupe on webhook-id, and which of them a sync has answered."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from arq.connections import ArqRedis
from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from worker import queue
from worker.intake import routing
from worker.intake.routing import ScopeRef
from worker.models import WebhookDelivery, WebhookDeliveryScope, utcnow
from worker.platform.db import (
    DriverStatements,
    driver_statements,
    retry_transaction,
)

log = structlog.get_logger("worker.intake.inbox")

# Younger deliveries are still being handed to Redis by the receiver; leave them be.
SWEEP_MIN_AGE = timedelta(seconds=10)


def sweep_min_age(window: queue.SyncWindow) -> timedelta:
    """How old an unanswered delivery must be for the sweeper to request its sync: a
    follow-up may rightly wait SYNC_MAX_WAIT_SECONDS, and re-requesting the scope while it
    waits or runs would only cost another list call."""
    return SWEEP_MIN_AGE + timedelta(seconds=window.max_wait)


async def mark_scope_synced(
    session: AsyncSession,
    *,
    kind: str,
    scope_id: str,
    fetched_after: datetime,
    now: datetime,
    sync_run_id: int | None,
) -> int:
    """In the reconcile's transaction: every delivery for this scope recorded before the
    fetch started is answered by it; a delivery is processed once all its scopes are.

    Driver statements (every sync runs this, most often with nothing to answer)."""
    db = await driver_statements(session)
    m = db.mark
    answered = await db.fetch(
        "UPDATE webhook_delivery_scope "  # noqa: S608 (placeholders only)
        f"SET processed_at = {m(1)}, sync_run_id = {m(2)} "
        f"WHERE scope_kind = {m(3)} AND scope_id = {m(4)} AND processed_at IS NULL "
        f"AND received_at <= {m(5)} RETURNING webhook_id",
        (db.timestamp(now), sync_run_id, kind, scope_id, db.timestamp(fetched_after)),
    )
    if not answered:
        return 0
    ids = sorted({row[0] for row in answered})
    params: list[Any]
    if db.dialect == "sqlite":
        # SQLite serialises writers: nothing to lock, the ids travel as one JSON array.
        chosen, params = "IN (SELECT value FROM json_each(?1))", [json.dumps(ids)]
    else:
        # Lock the deliveries before closing them: two syncs answering different scopes of
        # one delivery at once would each still see the other's scope open, and neither
        # would close it. The second waits here for the first to commit; its UPDATE then
        # sees it.
        chosen, params = "= ANY($1::varchar[])", [ids]
        await db.execute(
            f"SELECT webhook_id FROM webhook_delivery WHERE webhook_id {chosen} "  # noqa: S608
            "ORDER BY webhook_id FOR UPDATE",
            params,
        )
    await db.execute(
        f"UPDATE webhook_delivery SET processed_at = {m(2)}, outcome = 'synced' "  # noqa: S608 (placeholders only)
        f"WHERE webhook_id {chosen} AND processed_at IS NULL AND NOT EXISTS ("
        "SELECT 1 FROM webhook_delivery_scope s "
        "WHERE s.webhook_id = webhook_delivery.webhook_id AND s.processed_at IS NULL)",
        [*params, db.timestamp(now)],
    )
    return len(ids)


# ---------------------------------------------------------------------- recording


@dataclass(frozen=True)
class Recorded:
    """What the receiver stored for one delivery (nothing new when `duplicate`)."""

    duplicate: bool
    scopes: tuple[ScopeRef, ...] = ()
    routed: bool = True


def parse_event_timestamp(value: Any) -> datetime | None:
    """The envelope's ISO-8601 `timestamp`, or None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _hint_safely(event_type: str, data: Any) -> tuple[routing.RouteHint, str | None]:
    """The payload's routing hint; a payload we cannot make sense of must never cost the
    delivery: it is stored unrouted (the error) and the sweeper tries again."""
    try:
        return routing.hint_for(event_type, data), None
    except Exception as exc:  # a bug in routing must not turn into a failed delivery
        log.exception("webhook_routing_failed", event_type=event_type)
        return routing.RouteHint(), f"routing failed: {type(exc).__name__}"


async def _store_scopes(
    session: AsyncSession,
    delivery: WebhookDelivery,
    scopes: list[ScopeRef],
    now: datetime,
) -> None:
    delivery.routed_at = now
    if not scopes:
        delivery.processed_at, delivery.outcome = now, "ignored"
    for ref in scopes:
        session.add(
            WebhookDeliveryScope(
                webhook_id=delivery.webhook_id,
                scope_kind=ref.kind,
                scope_id=ref.scope_id,
                received_at=delivery.received_at,
            )
        )


async def record_delivery(
    session: AsyncSession,
    *,
    webhook_id: str,
    event_type: str,
    payload: str,
    envelope: dict[str, Any],
    now: datetime,
) -> Recorded:
    """Store a verified delivery and the scopes it asks to sync (flushes, never commits).

    A webhook-id we already hold is a redelivery: nothing is written. Two processes
    racing on the same id: the second one's insert does nothing, so it is a duplicate too.
    """
    hint, routing_error = _hint_safely(event_type, envelope.get("data"))
    routed = routing_error is None
    # Database errors of routing propagate (the delivery is refused with 503, and retried).
    scopes = await routing.resolve(session, hint) if routed else []
    # One statement decides new vs redelivery (the webhook-id is the primary key): a
    # concurrent twin loses here, not at commit. Driver statements: every webhook runs
    # this, and SQLAlchemy's ORM insert cost the receiver more than the rest of a request.
    db = await driver_statements(session)
    event_at = parse_event_timestamp(envelope.get("timestamp"))
    at = db.timestamp(now)
    values = (
        webhook_id,
        event_type[:64],
        None if event_at is None else db.timestamp(event_at),
        payload,
        at,
        at if routed else None,
        at if routed and not scopes else None,
        "ignored" if routed and not scopes else None,
        routing_error,
    )
    if not await _insert_delivery(db, values, scopes):
        # A redelivery: answered without new work. Should its first receipt never have
        # reached Redis, the sweeper requests its sync.
        return Recorded(duplicate=True)
    return Recorded(duplicate=False, scopes=tuple(scopes), routed=routed)


_DELIVERY_COLUMNS = (
    "webhook_id, event_type, event_timestamp, payload, received_at, routed_at, "
    "processed_at, outcome, error"
)


async def _insert_delivery(
    db: DriverStatements, stored: tuple[Any, ...], scopes: list[ScopeRef]
) -> bool:
    """Insert the delivery (`_DELIVERY_COLUMNS`, values in storage form) and its scopes
    unless its webhook-id is known; True if new. (Scope rows left from an earlier life of
    the webhook-id are kept, as before.)"""
    if db.dialect == "sqlite":
        inserted = await db.fetch(
            f"INSERT INTO webhook_delivery ({_DELIVERY_COLUMNS}) "  # noqa: S608
            "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) "
            "ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id",
            stored,
        )
        if inserted and scopes:
            await db.executemany(
                "INSERT INTO webhook_delivery_scope "
                "(webhook_id, scope_kind, scope_id, received_at) VALUES (?1, ?2, ?3, ?4) "
                "ON CONFLICT DO NOTHING",
                [(stored[0], ref.kind, ref.scope_id, stored[4]) for ref in scopes],
            )
        return bool(inserted)
    # PostgreSQL: both inserts in one statement (one round trip).
    [(inserted,)] = await db.fetch(
        f"WITH delivery AS (INSERT INTO webhook_delivery ({_DELIVERY_COLUMNS}) "  # noqa: S608
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
        "ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id), "
        "scopes AS (INSERT INTO webhook_delivery_scope "
        "(webhook_id, scope_kind, scope_id, received_at) "
        "SELECT delivery.webhook_id, s.kind, s.id, $5 "
        "FROM delivery, unnest($10::varchar[], $11::varchar[]) AS s(kind, id) "
        "ON CONFLICT DO NOTHING) "
        "SELECT count(*) FROM delivery",
        (*stored, [ref.kind for ref in scopes], [ref.scope_id for ref in scopes]),
    )
    return bool(inserted)


# ---------------------------------------------------------------------- sweeping


@dataclass
class SweepResult:
    routed: int = 0
    closed: int = 0
    requested: int = 0
    already_waiting: int = 0
    scopes: list[ScopeRef] = field(default_factory=list)


async def route_unrouted(session: AsyncSession, *, now: datetime, limit: int = 500) -> int:
    """Route deliveries the receiver stored without scopes (flushes, never commits)."""
    pending = (
        (
            await session.execute(
                select(WebhookDelivery)
                .where(
                    col(WebhookDelivery.routed_at).is_(None),
                    col(WebhookDelivery.processed_at).is_(None),
                )
                .order_by(col(WebhookDelivery.received_at))
                .limit(limit)
            )
        )
        .scalars()
        .all()
    )
    routed = 0
    for delivery in pending:
        try:
            envelope = json.loads(delivery.payload)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict):
            delivery.processed_at, delivery.outcome = now, "failed"
            delivery.error = "stored payload is not a JSON object"
            continue
        hint, routing_error = _hint_safely(delivery.event_type, envelope.get("data"))
        if routing_error is not None:
            delivery.error = routing_error
            continue
        scopes = await routing.resolve(session, hint)
        delivery.error = None
        await _store_scopes(session, delivery, scopes, now)
        routed += 1
    await session.flush()
    return routed


async def close_answered(session: AsyncSession, *, now: datetime) -> int:
    """Mark processed any routed delivery whose scopes are all answered (repair only:
    `mark_scope_synced` normally does this in the reconcile's transaction)."""
    still_open = exists().where(
        and_(
            col(col(WebhookDeliveryScope.webhook_id)) == WebhookDelivery.webhook_id,
            col(WebhookDeliveryScope.processed_at).is_(None),
        )
    )
    result = await session.execute(
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.processed_at).is_(None),
            col(WebhookDelivery.routed_at).is_not(None),
            ~still_open,
        )
        .values(processed_at=now, outcome="synced")
        .returning(col(WebhookDelivery.webhook_id))
    )
    return len(result.scalars().all())


async def unanswered_scopes(
    session: AsyncSession, *, received_before: datetime, limit: int = 1000
) -> list[ScopeRef]:
    """Scopes with a delivery recorded before `received_before` that no sync answered."""
    rows = await session.execute(
        select(col(WebhookDeliveryScope.scope_kind), col(WebhookDeliveryScope.scope_id))
        .where(
            col(WebhookDeliveryScope.processed_at).is_(None),
            col(WebhookDeliveryScope.received_at) < received_before,
        )
        .group_by(col(WebhookDeliveryScope.scope_kind), col(WebhookDeliveryScope.scope_id))
        .order_by(func.min(col(WebhookDeliveryScope.received_at)))
        .limit(limit)
    )
    return [ScopeRef(kind, scope_id) for kind, scope_id in rows.all()]


async def sweep_inbox(
    sessions: async_sessionmaker[AsyncSession],
    redis: ArqRedis,
    *,
    min_age: timedelta = SWEEP_MIN_AGE,
    now: datetime | None = None,
    window: queue.SyncWindow | None = None,
) -> SweepResult:
    """Nothing acknowledged is lost: route what was stored unrouted, then ask for a sync
    of every scope whose delivery is older than `min_age` and still unanswered (Redis was
    down at receipt, a job died, or its retries ran out)."""
    now = now or utcnow()
    result = SweepResult()

    async def repair(session: AsyncSession) -> tuple[int, int]:
        return (
            await route_unrouted(session, now=now),
            await close_answered(session, now=now),
        )

    result.routed, result.closed = await retry_transaction(sessions, repair)

    async def find(session: AsyncSession) -> list[ScopeRef]:
        return await unanswered_scopes(session, received_before=now - min_age)

    result.scopes = await retry_transaction(sessions, find)
    for ref in result.scopes:
        if await queue.request_sync(redis, ref.kind, ref.scope_id, trigger="sweep", window=window):
            result.requested += 1
        else:
            result.already_waiting += 1
    return result
