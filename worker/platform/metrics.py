"""Prometheus instruments: counters incremented where things happen, and the gauges that
`worker.query.gauges` fills from the database and Redis. Defining them here, below every
stage, lets any module count without importing what the gauges read."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

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


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
