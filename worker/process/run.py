"""The long-running processes: `run` (private Redis unless REDIS_URL, worker and receiver in
one process tree), `worker` (the queue worker alone) and `web` (the receiver alone)."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from worker.config import Settings
from worker.intake.receiver import serve
from worker.platform.db import redacted
from worker.process.startup import ensure_schema, resolve_redis_url
from worker.process.supervise import Part, keep_worker_running, run_until_signalled
from worker.schedule.jobs import build_worker

log = structlog.get_logger("worker.process.run")


@dataclass(frozen=True)
class Listen:
    """Where the webhook receiver listens."""

    host: str
    port: int


async def run_worker(settings: Settings, *, web: Listen | None = None) -> None:
    """The queue worker, with the receiver beside it when `web` says where, until SIGTERM or
    SIGINT. Starts the private Redis unless REDIS_URL is set, and stops what it started."""
    redis_url, embedded = await resolve_redis_url(settings, start=True)
    assert redis_url is not None
    try:
        await ensure_schema(settings)

        async def supervised_worker() -> None:
            await keep_worker_running(
                lambda: build_worker(settings, redis_url, handle_signals=False)
            )

        parts: list[Part] = [supervised_worker]
        if web is not None:

            async def receiver() -> None:
                # One metrics server per process: the worker's (on METRICS_PORT) already
                # shows the receiver's counters, which live in the same registry.
                await serve(
                    settings,
                    host=web.host,
                    port=web.port,
                    redis_url=redis_url,
                    handle_signals=False,
                    metrics_server=False,
                )

            parts.append(receiver)
        log.info(
            "seat_sync_started",
            database=redacted(settings.database_url),
            redis="embedded" if embedded else "external",
            web=f"http://{web.host}:{web.port}" if web is not None else None,
        )
        await run_until_signalled(parts)
    finally:
        if embedded is not None:
            await embedded.stop()


async def run_web(settings: Settings, *, listen: Listen) -> None:
    """The webhook receiver alone, until SIGTERM or SIGINT. It uses a Redis that is there
    (REDIS_URL, or a running private one) and never starts one. `/metrics` is on
    METRICS_PORT (when set), never on the webhook port."""
    await ensure_schema(settings)
    redis_url, _ = await resolve_redis_url(settings, start=False)
    await serve(settings, host=listen.host, port=listen.port, redis_url=redis_url)
