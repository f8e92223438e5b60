"""An in-process arq worker for tests that drive the queue themselves."""

from __future__ import annotations

from typing import Any

from worker.config import Settings
from worker.schedule.jobs import build_worker


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
