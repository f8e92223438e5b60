"""Prometheus metrics: counters where things happen, gauges read from the database and Redis
when scraped (web `/metrics`) or every few seconds (worker, optional METRICS_PORT)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select
from sqlmodel import col

from worker.inbox import pending_deliveries
from worker.models import Seat, SyncRun, utcnow
from worker.queue import QUEUE_NAME

if TYPE_CHECKING:
    from arq.connections import ArqRedis
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from worker.budget import RedisBudget
    from worker.services import Services

log = structlog.get_logger("worker.metrics")

WEBHOOKS = Counter(
    "seat_sync_webhooks_received_total",
    "Webhook deliveries received, by event type and outcome.",
    ["type", "outcome"],
)
SYNCS = Counter("seat_sync_syncs_total", "Scope syncs, by outcome.", ["outcome"])
POLAR_REQUESTS = Counter(
    "seat_sync_polar_requests_total", "Calls to the Polar API, by HTTP status.", ["status"]
)
RATE_LIMITED = Counter("seat_sync_polar_rate_limited_total", "429 answers from Polar.")
POLAR_MISCONFIGURED = Counter(
    "seat_sync_polar_misconfigured_total",
    "404 answers without an error code: a wrong POLAR_API_URL or POLAR_API_VERSION.",
)
RECONCILE_SECONDS = Histogram(
    "seat_sync_reconcile_seconds",
    "Time to reconcile one scope's list into the database.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DELIVERIES_PENDING = Gauge(
    "seat_sync_deliveries_pending", "Acknowledged webhook deliveries not yet processed."
)
OLDEST_PENDING = Gauge(
    "seat_sync_oldest_pending_delivery_age_seconds",
    "Age of the oldest acknowledged delivery not yet processed (0 when none).",
)
SEATS = Gauge("seat_sync_seats", "Mirrored seats by status (gone seats excluded).", ["status"])
LAST_FULL_RESYNC = Gauge(
    "seat_sync_last_full_resync_timestamp_seconds",
    "Unix time the last successful full resync finished (0 when never).",
)
BUDGET_LEFT = Gauge(
    "seat_sync_rate_budget_remaining", "Polar calls left in the current rate window."
)
QUEUE_DEPTH = Gauge("seat_sync_queue_depth", "Jobs waiting in the arq queue.")


def observe_polar_status(status: int | str) -> None:
    POLAR_REQUESTS.labels(status=str(status)).inc()
    if status == 429:
        RATE_LIMITED.inc()


async def refresh(
    sessions: async_sessionmaker[AsyncSession],
    *,
    redis: ArqRedis | None = None,
    budget: RedisBudget | None = None,
) -> None:
    """Read the state-derived gauges. Failures leave the previous values in place."""
    try:
        async with sessions() as session:
            pending = await pending_deliveries(session)
            by_status = (
                await session.execute(
                    select(col(Seat.status), func.count())
                    .where(col(Seat.gone_at).is_(None))
                    .group_by(col(Seat.status))
                )
            ).all()
            last_full = (
                await session.execute(
                    select(func.max(SyncRun.finished_at)).where(
                        col(SyncRun.kind) == "full", col(SyncRun.status) == "ok"
                    )
                )
            ).scalar_one_or_none()
    except Exception as exc:  # a scrape must answer even when the database is down
        log.warning("metrics_refresh_failed", error=type(exc).__name__)
        return
    DELIVERIES_PENDING.set(int(pending[0]))
    oldest = pending[1]
    OLDEST_PENDING.set((utcnow() - oldest).total_seconds() if oldest is not None else 0)
    counts = {str(s): int(n) for s, n in by_status}
    for status in ("pending", "claimed", "revoked"):
        SEATS.labels(status=status).set(counts.get(status, 0))
    LAST_FULL_RESYNC.set(last_full.timestamp() if last_full is not None else 0)
    if redis is not None:
        with contextlib.suppress(Exception):
            QUEUE_DEPTH.set(int(await redis.zcard(QUEUE_NAME)))
    if budget is not None:
        with contextlib.suppress(Exception):
            BUDGET_LEFT.set(max(0, budget.per_minute - await budget.used()))


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST


async def serve_worker_metrics(services: Services, port: int, *, every: float = 10.0) -> None:
    """The worker's optional /metrics endpoint, refreshed in the background."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port)
    log.info("metrics_listening", port=port)
    try:
        while True:
            started = time.monotonic()
            await refresh(services.sessions, redis=services.redis, budget=services.budget)
            await asyncio.sleep(max(1.0, every - (time.monotonic() - started)))
    finally:
        server.shutdown()
        thread.join(timeout=5)
