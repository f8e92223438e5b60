"""`seat-sync status`: is the mirror keeping up? Last full resyncs, failing scopes, the
inbox backlog, queue depth and rate budget (when a Redis is reachable), invitation work, and
what to check when Polar's answers say the configuration is wrong."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from worker.polar.errors import CHECK_CONFIGURATION
from worker.query import fleet
from worker.query.environment import MirrorConfig
from worker.query.mirror import Mirror, as_datetime, iso, like_escaped, open_mirror, socket_path

RECENT_PASSES = 5
FAILING_SHOWN = 20

PASSES_SQL = (
    "SELECT id, started_at, finished_at, status, scopes_seen, api_calls, updated, errors, "
    "error FROM sync_run WHERE kind = 'full' ORDER BY id DESC LIMIT :limit"
)
FAILING_SQL = (
    "SELECT kind, scope_id, consecutive_failures, last_error FROM seat_scope "
    "WHERE consecutive_failures > 0 "
    "ORDER BY consecutive_failures DESC, kind, scope_id LIMIT :limit"
)
# Failing scopes whose last error is Polar's answer to a wrong URL or API version.
MISCONFIGURED_SQL = (
    "SELECT count(*) AS n FROM seat_scope WHERE consecutive_failures > 0 "
    "AND last_error LIKE :needle ESCAPE '\\'"
)
PENDING_SQL = (
    "SELECT count(*) AS n, min(received_at) AS oldest FROM webhook_delivery "
    "WHERE processed_at IS NULL"
)
REMINDERS_SQL = "SELECT outcome AS value, count(*) AS n FROM invitation_reminder GROUP BY outcome"
RENEWALS_SQL = "SELECT state AS value, count(*) AS n FROM invitation_renewal GROUP BY state"


def configuration_problem(
    settings: MirrorConfig, failing_scopes: int, last_pass: Mapping[str, Any] | None
) -> str | None:
    """What to check when Polar answers 404 without an error code (failing scopes now, or
    the last full resync stopped by it)."""
    where = (
        [f"{failing_scopes} scope{'' if failing_scopes == 1 else 's'} failing"]
        if failing_scopes
        else []
    )
    if (
        last_pass is not None
        and last_pass["status"] == "failed"
        and CHECK_CONFIGURATION in (last_pass["error"] or "")
    ):
        where.append(f"full resync #{last_pass['id']} stopped")
    if not where:
        return None
    return (
        f"Polar answered 404 without an error code ({', '.join(where)}): check POLAR_API_URL "
        f"({settings.polar_api_url}) and POLAR_API_VERSION ({settings.polar_api_version})"
    )


def _pass_json(run: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": run["id"],
        "started_at": iso(run["started_at"]),
        "finished_at": iso(run["finished_at"]),
        "status": run["status"],
        "scopes": run["scopes_seen"],
        "api_calls": run["api_calls"],
        "seats_changed": run["updated"],
        "errors": run["errors"],
    }


def _age_s(now: datetime, then: Any) -> float | None:
    moment = as_datetime(then)
    return round((now - moment).total_seconds(), 1) if moment is not None else None


def _tally(mirror: Mirror, sql: str) -> dict[str, int]:
    return {str(row["value"]): int(row["n"]) for row in mirror.rows(sql)}


def mirror_report(mirror: Mirror, settings: MirrorConfig) -> dict[str, Any]:
    """The database part of the report."""
    now = datetime.now(UTC)
    passes = mirror.rows(PASSES_SQL, {"limit": RECENT_PASSES})
    [misconfigured] = mirror.rows(
        MISCONFIGURED_SQL, {"needle": f"%{like_escaped(CHECK_CONFIGURATION)}%"}
    )
    [pending] = mirror.rows(PENDING_SQL)
    return {
        "polar": {
            "api_url": settings.polar_api_url,
            "api_version": settings.polar_api_version,
            "problem": configuration_problem(
                settings, int(misconfigured["n"]), passes[0] if passes else None
            ),
        },
        "full_resyncs": [_pass_json(p) for p in passes],
        "failing_scopes": [dict(f) for f in mirror.rows(FAILING_SQL, {"limit": FAILING_SHOWN})],
        "deliveries_pending": int(pending["n"]),
        "oldest_pending_delivery_age_s": _age_s(now, pending["oldest"]),
        "reminders": _tally(mirror, REMINDERS_SQL),
        "renewals": _tally(mirror, RENEWALS_SQL),
    }


async def _client_figures(url: str, settings: MirrorConfig) -> tuple[int, int]:
    """The same figures through the worker's own Redis client (URLs with options)."""
    from arq.connections import create_pool

    from worker.polar.budget import RedisBudget
    from worker.queue import QUEUE_NAME, redis_settings

    redis = await create_pool(redis_settings(url))
    try:
        budget = RedisBudget(
            redis,
            settings.polar_requests_per_minute,
            window_ms=int(settings.polar_rate_window_seconds * 1000),
        )
        return int(await redis.zcard(QUEUE_NAME)), await budget.used()
    finally:
        await redis.aclose()


def redis_figures(settings: MirrorConfig) -> tuple[int | None, int | None]:
    """(jobs queued, Polar calls spent in the current rate window) from the fleet's Redis:
    REDIS_URL, or the private Redis when one is serving; (None, None) without one, or when
    it does not answer (the report says what the database knows all the same)."""
    url = settings.redis_url
    if url is None:
        path = socket_path(settings.data_dir)
        if not path.exists():
            return None, None  # no private Redis running: nothing to ask, nothing to load
        url = f"unix://{path}"
    try:
        found = fleet.figures(url, int(settings.polar_rate_window_seconds * 1000))
        if found is None:
            import asyncio

            found = asyncio.run(_client_figures(url, settings))
    except Exception:  # unreachable, refused, timed out: unknown, as without a Redis
        return None, None
    return found


def status_report(settings: MirrorConfig) -> dict[str, Any]:
    """The report `seat-sync status` prints (and its JSON): plain values only. Redis-only
    figures (queue depth, rate budget) are None when no Redis is reachable."""
    with open_mirror(settings) as mirror:
        report = mirror_report(mirror, settings)
    queue_depth, budget_used = redis_figures(settings)
    report["queue_depth"] = queue_depth
    report["rate_budget"] = (
        {"used": budget_used, "limit": settings.polar_requests_per_minute}
        if budget_used is not None
        else None
    )
    return report
