"""Waiting for a condition that other tasks or processes bring about."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable

import httpx
from arq.connections import ArqRedis
from arq.jobs import Job

from worker import queue


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    within: float,
    what: str | Callable[[], str],
    every: float = 0.1,
) -> None:
    """Poll `check` (plain or async) every `every` seconds until it holds; fail the test
    naming `what` if it does not within `within` seconds (a callable `what` is asked then,
    e.g. for the log of a process that never came up)."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"not reached within {within:g} s: {said}")
        await asyncio.sleep(every)


async def until_answering(
    url: str, *, within: float, what: str | Callable[[], str], every: float = 0.05
) -> None:
    """Wait until `GET url` answers 200: a server another task or process is starting.
    Refused and cut connections count as "not yet"."""
    async with httpx.AsyncClient(timeout=2) as client:

        async def answers() -> bool:
            with contextlib.suppress(httpx.TransportError):
                return (await client.get(url)).status_code == 200
            return False

        await eventually(answers, within=within, what=what, every=every)


async def sync_activity(redis_url: str) -> list[str]:
    """Every scope sync the queue still has: a `sync_scope` job waiting, deferred or
    running (arq keeps a job in its queue until it ends, retries included), a scope whose
    sync is flagged as waiting, or one marked as running (worker.queue's coalescing keys).
    Empty when no sync is due. Other jobs are left out: a unique cron job enqueued twice
    (two workers, one slot) waits up to a minute behind its twin's kept in-progress key."""
    redis = ArqRedis.from_url(redis_url)
    try:
        found: list[str] = []
        for raw in await redis.zrange(queue.QUEUE_NAME, 0, -1):
            job_id = raw.decode()
            info = await Job(job_id, redis, _queue_name=queue.QUEUE_NAME).info()
            if info is None or info.function == queue.SYNC_SCOPE:
                found.append(f"job {job_id}")
        for state, pattern in (
            ("waiting", queue.queued_key("*", "*")),
            ("running", queue.syncing_key("*", "*")),
        ):
            found += [f"{state}: {key.decode()}" async for key in redis.scan_iter(pattern)]
        return found
    finally:
        await redis.aclose()


async def until_syncs_done(redis_url: str, *, within: float, every: float = 0.1) -> None:
    """Wait until no scope sync waits, is deferred or runs (`sync_activity`). Call it once
    nothing will request a sync any more (webhooks delivered, inbox answered): a trailing
    follow-up starts up to SYNC_MAX_WAIT_SECONDS after a change, so the mirror can be
    right while syncs are still due, and stopping the workers then cancels them."""
    left: list[str] = []

    async def done() -> bool:
        left[:] = await sync_activity(redis_url)
        return not left

    await eventually(done, within=within, every=every, what=lambda: f"syncs still due: {left[:10]}")
