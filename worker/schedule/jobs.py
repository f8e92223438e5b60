"""arq jobs and the worker's settings. Jobs are thin: they call one service function."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

import structlog
from arq import Retry
from arq.cron import cron
from arq.worker import Function, Worker, func
from sqlalchemy.exc import DBAPIError, OperationalError

from worker import queue
from worker.config import Settings
from worker.intake import inbox
from worker.platform.db import is_retryable_db_error
from worker.platform.migrate import check_schema
from worker.platform.serving import serve_metrics
from worker.polar.errors import AuthError, PolarMisconfiguredError, RateLimitedError
from worker.polar.retry import TRANSIENT, backoff, retry_delay
from worker.query import gauges
from worker.resources import WorkerResources
from worker.schedule import invitations
from worker.sync import resync
from worker.sync import scope as sync

log = structlog.get_logger("worker.schedule.jobs")

Ctx = dict[str, Any]

# arq keeps a job "in progress" for the longest timeout of all functions (+10 s): a job
# whose worker was killed is retried only after that. A full pass is resumable and cron
# resumes it every minute, so a pass is cut into 15-minute slices rather than one long job.
RESYNC_TIMEOUT_S = 900
REMIND_TIMEOUT_S = 600
SYNC_TIMEOUT_S = 120
# A scope run still `running` after its job's timeout belongs to a dead worker.
STALE_RUN = timedelta(seconds=SYNC_TIMEOUT_S * 5)


async def sync_scope(ctx: Ctx, *, kind: str, scope_id: str, trigger: str = "webhook") -> str:
    """Mirror one subscription or order from Polar's authoritative list."""
    resources: WorkerResources = ctx["services"]
    job_try: int = ctx.get("job_try", 1)
    job_id: str = ctx["job_id"]
    bound = log.bind(job_id=job_id, scope_kind=kind, scope_id=scope_id, job_try=job_try)
    # Before the fetch: a change from now on needs a follow-up (worker.queue's rules).
    if not await queue.sync_started(
        resources.redis, kind, scope_id, job_id=job_id, ttl=SYNC_TIMEOUT_S
    ):
        bound.info("sync_superseded")  # a job of the scope that started later covers it
        return "superseded"
    try:
        return await _fetch_and_reconcile(
            resources,
            bound,
            kind=kind,
            scope_id=scope_id,
            trigger=trigger,
            job_id=job_id,
            job_try=job_try,
        )
    finally:
        try:
            await queue.sync_finished(resources.redis, kind, scope_id, job_id=job_id)
        except Exception as exc:  # Redis down: the marker expires on its own
            bound.warning("sync_finish_unrecorded", error=type(exc).__name__)


async def _fetch_and_reconcile(
    resources: WorkerResources,
    bound: Any,
    *,
    kind: str,
    scope_id: str,
    trigger: str,
    job_id: str,
    job_try: int,
) -> str:
    """The sync, its failures translated for arq (Retry with backoff, or raised)."""
    try:
        outcome = await sync.sync_scope(
            resources,
            kind=kind,
            scope_id=scope_id,
            trigger=trigger,
            lane="webhook",
            job_id=job_id,
        )
    except TRANSIENT as exc:
        defer = retry_delay(exc, job_try, base=resources.settings.sync_retry_base_seconds)
        assert defer is not None
        if isinstance(exc, RateLimitedError):
            bound.warning("sync_rate_limited", retry_after=exc.retry_after, defer=round(defer, 2))
        else:
            bound.warning("sync_retry", error=str(exc), defer=round(defer, 2))
        raise Retry(defer=defer) from None
    except AuthError as exc:
        bound.error("sync_auth_failed", error=str(exc))
        raise
    except PolarMisconfiguredError:
        # Retrying cannot help until the configuration is fixed; the failure is recorded on
        # the scope, and the next full resync or webhook tries again.
        raise
    except (OperationalError, DBAPIError, OSError) as exc:
        if not is_retryable_db_error(exc) and not isinstance(exc, OSError):
            raise
        defer = backoff(job_try, base=resources.settings.sync_retry_base_seconds)
        bound.warning("sync_db_unavailable", error=type(exc).__name__, defer=round(defer, 2))
        raise Retry(defer=defer) from None
    return outcome.status


async def sweep_inbox(ctx: Ctx, *, min_age_seconds: float | None = None) -> int:
    """Re-request a sync for every acknowledged delivery no sync has answered yet."""
    resources: WorkerResources = ctx["services"]
    window = queue.SyncWindow.of(resources.settings)
    min_age = (
        inbox.sweep_min_age(window)
        if min_age_seconds is None
        else timedelta(seconds=min_age_seconds)
    )
    result = await inbox.sweep_inbox(
        resources.sessions, resources.redis, min_age=min_age, window=window
    )
    abandoned = await sync.abandon_stale_runs(resources, older_than=STALE_RUN)
    if abandoned:
        log.warning("sync_runs_abandoned", count=abandoned)
    if result.scopes or result.routed or result.closed:
        log.info(
            "inbox_swept",
            job_id=ctx.get("job_id"),
            routed=result.routed,
            closed=result.closed,
            scopes=len(result.scopes),
            requested=result.requested,
            already_waiting=result.already_waiting,
        )
    return result.requested


async def resync_all(ctx: Ctx) -> str:
    """Cron, every minute: run a full pass when one is due, or resume an interrupted one."""
    resources: WorkerResources = ctx["services"]
    try:
        summary = await resync.resync_all(resources, trigger="cron")
    except resync.PassBusyError:
        return "busy"
    return "not due" if summary is None else f"pass {summary.run_id}: {summary.scopes} scopes"


async def remind_expiring(ctx: Ctx) -> str:
    """Cron, every minute; acts every REMIND_INTERVAL_MINUTES, once across the fleet."""
    resources: WorkerResources = ctx["services"]
    settings = resources.settings
    gate = int(settings.remind_interval_minutes * 60)
    if not await resources.redis.set(queue.REMIND_GATE_KEY, "1", nx=True, ex=max(1, gate - 5)):
        return "not due"
    report = await invitations.remind_expiring(resources)
    renewed = ""
    if settings.renew_expired_invitations:
        renewal = await invitations.renew_expired(resources)
        renewed = f"; renewals {renewal.outcomes}"
    log.info("reminders_done", planned=len(report.planned), outcomes=report.outcomes)
    return f"reminders {report.outcomes}{renewed}"


async def startup(ctx: Ctx) -> None:
    settings: Settings = ctx["settings"]
    resources = await WorkerResources.create(settings, redis_url=ctx["redis_url"])
    try:
        await check_schema(resources.engine)
    except BaseException:
        await resources.aclose()
        raise
    # Under "services", the key the worker's resources have always had in the job context.
    ctx["services"] = resources
    if settings.metrics_port is not None:

        async def refresh() -> None:
            await gauges.refresh(resources.sessions, redis=resources.redis, budget=resources.budget)

        ctx["metrics_task"] = asyncio.create_task(
            serve_metrics(
                settings.metrics_port,
                refresh,
                every=settings.metrics_refresh_seconds,
                host=settings.metrics_host,
            )
        )
    log.info("worker_started", polar_api_url=settings.polar_api_url)


async def shutdown(ctx: Ctx) -> None:
    task: asyncio.Task[None] | None = ctx.get("metrics_task")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    resources: WorkerResources | None = ctx.get("services")
    if resources is not None:
        await resources.aclose()
    log.info("worker_stopped")


def functions(settings: Settings) -> list[Function]:
    return [
        # A short timeout: when a worker dies mid-job, arq runs the job again once it expires.
        func(
            sync_scope,
            name=queue.SYNC_SCOPE,
            keep_result=0,
            max_tries=settings.sync_max_tries,
            timeout=SYNC_TIMEOUT_S,
        ),
        func(sweep_inbox, name=queue.SWEEP_INBOX, keep_result=0, max_tries=1),
        func(
            resync_all, name=queue.RESYNC_ALL, keep_result=0, max_tries=1, timeout=RESYNC_TIMEOUT_S
        ),
        func(
            remind_expiring,
            name=queue.REMIND_EXPIRING,
            keep_result=0,
            max_tries=1,
            timeout=REMIND_TIMEOUT_S,
        ),
    ]


def build_worker(
    settings: Settings,
    redis_url: str,
    *,
    burst: bool = False,
    handle_signals: bool = True,
    max_jobs: int = 10,
    cron_jobs: bool = True,
) -> Worker:
    """The arq worker for this deployment (also what `seat-sync worker` runs). Tests that
    count API calls exactly turn `cron_jobs` off (sweep, full resync and reminders)."""
    schedule = [
        cron(
            sweep_inbox,
            name=queue.SWEEP_INBOX,
            second={0, 15, 30, 45},
            run_at_startup=True,
            unique=True,
            keep_result=0,
        ),
        cron(
            resync_all,
            name=queue.RESYNC_ALL,
            second=5,
            run_at_startup=True,
            unique=True,
            keep_result=0,
            timeout=RESYNC_TIMEOUT_S,
            max_tries=1,
        ),
        cron(
            remind_expiring,
            name=queue.REMIND_EXPIRING,
            second=35,
            run_at_startup=True,
            unique=True,
            keep_result=0,
            timeout=REMIND_TIMEOUT_S,
            max_tries=1,
        ),
        # Daily retention (worker.schedule.retention), at a quiet minute; once per fleet.
        cron(
            "worker.schedule.retention.prune_job",
            name="prune_mirror",
            hour=3,
            minute=17,
            second=50,
            unique=True,
            keep_result=0,
            timeout=3600,
            max_tries=1,
        ),
    ]
    return Worker(
        functions=functions(settings),
        cron_jobs=schedule if cron_jobs else [],
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
        # How long a job that may run waits to be noticed: the leading sync of a lone change
        # starts within it (20 ms; one cheap Redis read per poll per worker).
        poll_delay=0.02,
        max_tries=settings.sync_max_tries,
        health_check_interval=60,
        health_check_key=f"{queue.QUEUE_NAME}:health-check",
        log_results=False,
    )
