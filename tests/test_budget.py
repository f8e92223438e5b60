"""The fleet-wide rate budget in real Redis: lanes, reserve for webhook syncs, 429 pause."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis, create_pool

from worker.polar.budget import RedisBudget
from worker.queue import redis_settings


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(redis_settings(redis_url))
    try:
        yield pool
    finally:
        await pool.aclose()


async def taken_within(budget: RedisBudget, lane: str, attempts: int, seconds: float) -> int:
    taken = 0
    for _ in range(attempts):
        try:
            await asyncio.wait_for(budget.acquire(lane), seconds)  # type: ignore[arg-type]
        except TimeoutError:
            break
        taken += 1
    return taken


async def test_resync_leaves_a_floor_for_webhooks(redis: ArqRedis) -> None:
    budget = RedisBudget(redis, 40, window_ms=10_000)
    assert await taken_within(budget, "resync", 40, 0.2) == 38  # 5 % floor kept free
    assert await taken_within(budget, "webhook", 5, 0.2) == 2  # webhooks get the floor
    assert await budget.used() == 40


async def test_reserve_grows_with_recent_webhook_traffic(redis: ArqRedis) -> None:
    budget = RedisBudget(redis, 40, window_ms=10_000)
    assert await taken_within(budget, "webhook", 10, 0.2) == 10
    # Resync must now leave 2 x 10 free: it gets 40 - 10 used - 20 reserved = 10.
    assert await taken_within(budget, "resync", 40, 0.2) == 10
    assert await taken_within(budget, "reminder", 40, 0.2) == 10  # leaves 1 x 10: up to 30
    assert await taken_within(budget, "webhook", 40, 0.2) == 10


async def test_a_429_pauses_every_lane(redis: ArqRedis) -> None:
    budget = RedisBudget(redis, 1000, window_ms=60_000)
    other_process = RedisBudget(redis, 1000, window_ms=60_000)
    await budget.pause(0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await other_process.acquire("webhook")
    assert loop.time() - started >= 0.45


async def test_the_window_slides(redis: ArqRedis) -> None:
    budget = RedisBudget(redis, 5, window_ms=400)
    assert await taken_within(budget, "webhook", 10, 0.05) == 5
    await asyncio.sleep(0.45)
    assert await taken_within(budget, "webhook", 10, 0.05) == 5
