"""arq jobs and the worker's settings. Jobs are thin: they call one service function."""

from __future__ import annotations

import random
from typing import Any

import structlog
from arq import Retry
from arq.worker import Function, Worker, func
from sqlalchemy.exc import DBAPIError, OperationalError

from worker import queue, sync
from worker.config import Settings
from worker.db import is_retryable_db_error
from worker.migrate import check_schema
from worker.polar import AuthError, RateLimited, TransientError
from worker.services import Services

log = structlog.get_logger("worker.jobs")

Ctx = dict[str, Any]


def backoff_seconds(job_try: int, *, base: float = 1.0, cap: float = 120.0) -> float:
    """Exponential backoff with jitter: 1-2 s, 2-4 s, 4-8 s ... (times `base`) up to `cap`."""
    delay = min(cap, base * 2.0 ** max(0, job_try - 1))
    return delay + random.uniform(0, delay)


async def sync_scope(ctx: Ctx, *, kind: str, scope_id: str, trigger: str = "webhook") -> str:
    """Mirror one subscription or order from Polar's authoritative list."""
    services: Services = ctx["services"]
    job_try: int = ctx.get("job_try", 1)
    bound = log.bind(job_id=ctx.get("job_id"), scope_kind=kind, scope_id=scope_id, job_try=job_try)
    if services.redis is not None:
        await queue.sync_started(services.redis, kind, scope_id)
    try:
        outcome = await sync.sync_scope(
            services,
            kind=kind,
            scope_id=scope_id,
            trigger=trigger,
            lane="webhook",
            job_id=ctx.get("job_id"),
        )
    except RateLimited as exc:
        bound.warning("sync_rate_limited", retry_after=exc.retry_after)
        raise Retry(defer=exc.retry_after + random.uniform(0, 2)) from None
    except TransientError as exc:
        defer = backoff_seconds(job_try, base=services.settings.sync_retry_base_seconds)
        bound.warning("sync_retry", error=str(exc), defer=round(defer, 2))
        raise Retry(defer=defer) from None
    except AuthError as exc:
        bound.error("sync_auth_failed", error=str(exc))
        raise
    except (OperationalError, DBAPIError, OSError) as exc:
        if not is_retryable_db_error(exc) and not isinstance(exc, OSError):
            raise
        defer = backoff_seconds(job_try, base=services.settings.sync_retry_base_seconds)
        bound.warning("sync_db_unavailable", error=type(exc).__name__, defer=round(defer, 2))
        raise Retry(defer=defer) from None
    return outcome.status


async def startup(ctx: Ctx) -> None:
    settings: Settings = ctx["settings"]
    services = await Services.start(settings, redis_url=ctx["redis_url"])
    try:
        await check_schema(services.engine)
    except BaseException:
        await services.close()
        raise
    ctx["services"] = services
    log.info("worker_started", polar_api_url=settings.polar_api_url)


async def shutdown(ctx: Ctx) -> None:
    services: Services | None = ctx.get("services")
    if services is not None:
        await services.close()
    log.info("worker_stopped")


def functions(settings: Settings) -> list[Function]:
    return [
        func(sync_scope, name=queue.SYNC_SCOPE, keep_result=0, max_tries=settings.sync_max_tries),
    ]


def build_worker(
    settings: Settings,
    redis_url: str,
    *,
    burst: bool = False,
    handle_signals: bool = True,
    max_jobs: int = 10,
) -> Worker:
    """The arq worker for this deployment (also what `seat-sync worker` runs)."""
    return Worker(
        functions=functions(settings),
        queue_name=queue.QUEUE_NAME,
        redis_settings=queue.redis_settings(redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        ctx={"settings": settings, "redis_url": redis_url},
        burst=burst,
        handle_signals=handle_signals,
        max_jobs=max_jobs,
        job_timeout=600,
        keep_result=0,
        poll_delay=0.05,
        max_tries=settings.sync_max_tries,
        health_check_interval=60,
        health_check_key=f"{queue.QUEUE_NAME}:health-check",
        log_results=False,
    )
