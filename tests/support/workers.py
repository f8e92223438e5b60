"""In-process work for tests that drive the queue themselves: an arq worker run until the
queue is empty, the resources its jobs get, and scopes synced directly as setup."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from worker.config import Settings
from worker.resources import WorkerResources
from worker.schedule.jobs import build_worker
from worker.sync.scope import sync_scope


async def run_worker_until_idle(
    settings: Settings, redis_url: str, *, max_jobs: int = 10, cron_jobs: bool = False
) -> Any:
    """Run an in-process arq worker until the queue is empty (burst mode). Its cron jobs
    are off unless asked for, so that tests count Polar calls exactly."""
    worker = build_worker(
        settings,
        redis_url,
        burst=True,
        handle_signals=False,
        max_jobs=max_jobs,
        cron_jobs=cron_jobs,
    )
    try:
        await worker.async_run()
    finally:
        await worker.close()
    return worker


@contextlib.asynccontextmanager
async def worker_resources(settings: Settings, redis_url: str) -> AsyncIterator[WorkerResources]:
    """What a worker's jobs get (database, Polar, Redis, budget) for these settings, closed
    on exit."""
    resources = await WorkerResources.create(settings, redis_url=redis_url)
    async with contextlib.aclosing(resources):
        yield resources


async def mirror_subscriptions(settings: Settings, redis_url: str, *subscription_ids: str) -> None:
    """Sync these subscriptions into the mirror in this process (setup, before the test's
    own processes start)."""
    async with worker_resources(settings, redis_url) as resources:
        for subscription_id in subscription_ids:
            await sync_scope(resources, kind="subscription", scope_id=subscription_id)
