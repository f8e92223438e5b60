"""Coalescing keys in real Redis: one waiting job per scope, follow-ups spaced by the interval."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis, create_pool

from worker import queue


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(queue.redis_settings(redis_url))
    try:
        yield pool
    finally:
        await pool.aclose()


async def scores(redis: ArqRedis) -> list[float]:
    return [score for _, score in await redis.zrange(queue.QUEUE_NAME, 0, -1, withscores=True)]


async def test_one_waiting_job_per_scope(redis: ArqRedis) -> None:
    assert await queue.request_sync(redis, "subscription", "s1")
    for _ in range(50):
        assert not await queue.request_sync(redis, "subscription", "s1")
    assert await queue.request_sync(redis, "order", "o1")
    assert len(await scores(redis)) == 2


async def test_an_event_during_a_sync_queues_one_follow_up_after_the_interval(
    redis: ArqRedis,
) -> None:
    assert await queue.request_sync(redis, "subscription", "s1")
    await redis.zremrangebyrank(queue.QUEUE_NAME, 0, -1)  # the worker took the job
    await queue.sync_started(redis, "subscription", "s1", min_interval=1.0)
    before_ms = time.time() * 1000
    assert await queue.request_sync(redis, "subscription", "s1")
    assert not await queue.request_sync(redis, "subscription", "s1")
    [score] = await scores(redis)
    assert before_ms + 900 <= score <= before_ms + 1100  # deferred to one interval after


async def test_without_a_recent_sync_the_job_runs_at_once(redis: ArqRedis) -> None:
    await queue.sync_started(redis, "subscription", "s1", min_interval=0.0)
    before_ms = time.time() * 1000
    assert await queue.request_sync(redis, "subscription", "s1")
    [score] = await scores(redis)
    assert score <= before_ms + 100
