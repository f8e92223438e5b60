"""Reads of the webhook inbox (for status and metrics)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.models import WebhookDelivery


async def pending_deliveries(session: AsyncSession) -> tuple[int, datetime | None]:
    """(acknowledged deliveries not yet processed, when the oldest of them arrived)."""
    count, oldest = (
        await session.execute(
            select(func.count(), func.min(WebhookDelivery.received_at)).where(
                col(WebhookDelivery.processed_at).is_(None)
            )
        )
    ).one()
    return int(count), oldest
