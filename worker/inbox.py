"""Durable webhook deliveries: dedupe on webhook-id, and which of them a sync has answered."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, exists, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.models import WebhookDelivery, WebhookDeliveryScope


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
    fetch started is answered by it; a delivery is processed once all its scopes are."""
    answered = (
        (
            await session.execute(
                update(WebhookDeliveryScope)
                .where(
                    col(col(WebhookDeliveryScope.scope_kind)) == kind,
                    col(col(WebhookDeliveryScope.scope_id)) == scope_id,
                    col(WebhookDeliveryScope.processed_at).is_(None),
                    col(col(WebhookDeliveryScope.received_at)) <= fetched_after,
                )
                .values(processed_at=now, sync_run_id=sync_run_id)
                .returning(col(WebhookDeliveryScope.webhook_id))
            )
        )
        .scalars()
        .all()
    )
    if not answered:
        return 0
    still_open = exists().where(
        and_(
            col(col(WebhookDeliveryScope.webhook_id)) == WebhookDelivery.webhook_id,
            col(WebhookDeliveryScope.processed_at).is_(None),
        )
    )
    for start in range(0, len(answered), 500):
        chunk = list(answered[start : start + 500])
        await session.execute(
            update(WebhookDelivery)
            .where(
                col(WebhookDelivery.webhook_id).in_(chunk),
                col(WebhookDelivery.processed_at).is_(None),
                ~still_open,
            )
            .values(processed_at=now, outcome="synced")
        )
    return len(answered)
