"""Coalescing keys in real Redis: the leading edge at once, one waiting job per scope, one
follow-up pushed back by each change until the scope is quiet, never past the maximum wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from arq.connections import ArqRedis, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import Job

from worker import queue

SUB = ("subscription", "s1")
# Long enough that "at once" and "after the quiet period" cannot be confused on a slow
# machine; the tests never wait for it.
PATIENT = queue.SyncWindow(quiet=5.0, max_wait=60.0)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(queue.redis_settings(redis_url))
    try:
        yield pool
    finally:
        await pool.aclose()


async def jobs(redis: ArqRedis) -> dict[str, float]:
    """Every job in the queue and the time (ms) it may start."""
    return {
        member.decode(): score
        for member, score in await redis.zrange(queue.QUEUE_NAME, 0, -1, withscores=True)
    }


async def waiting_job(redis: ArqRedis, kind: str = SUB[0], scope_id: str = SUB[1]) -> str:
    flag = await redis.get(queue.queued_key(kind, scope_id))
    assert flag is not None, "no job waits for the scope"
    return str(flag.decode())


async def start(redis: ArqRedis, job_id: str) -> None:
    """What the sync job does before it fetches."""
    await queue.sync_started(redis, *SUB, job_id=job_id, ttl=60)


async def finish(redis: ArqRedis, job_id: str) -> None:
    """What arq and the sync job do when it ends."""
    await queue.sync_finished(redis, *SUB, job_id=job_id)
    await redis.zrem(queue.QUEUE_NAME, job_id)
    await redis.delete(job_key_prefix + job_id)


async def a_retry_with_a_follow_up_waiting(redis: ArqRedis) -> tuple[str, str]:
    """A sync that started and raised Retry, and the follow-up a change during it queued:
    (the failing job, the follow-up)."""
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    failing = await waiting_job(redis)
    await start(redis, failing)
    await queue.sync_finished(redis, *SUB, job_id=failing)  # it raised Retry
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    return failing, await waiting_job(redis)


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------- leading edge


async def test_a_change_on_a_quiet_scope_is_synced_at_once(redis: ArqRedis) -> None:
    before = now_ms()
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    [score] = (await jobs(redis)).values()
    assert score <= now_ms()
    assert score >= before


async def test_the_job_is_one_arq_runs(redis: ArqRedis) -> None:
    assert await queue.request_sync(redis, *SUB, trigger="sweep", window=PATIENT)
    info = await Job(await waiting_job(redis), redis, _queue_name=queue.QUEUE_NAME).info()
    assert info is not None
    assert info.function == queue.SYNC_SCOPE
    assert info.kwargs == {"kind": "subscription", "scope_id": "s1", "trigger": "sweep"}


async def test_one_waiting_job_per_scope(redis: ArqRedis) -> None:
    assert await queue.request_sync(redis, *SUB)
    for _ in range(50):
        assert not await queue.request_sync(redis, *SUB)
    assert await queue.request_sync(redis, "order", "o1")
    assert len(await jobs(redis)) == 2


async def test_changes_while_the_leading_job_waits_do_not_delay_it(redis: ArqRedis) -> None:
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    first = await jobs(redis)
    await asyncio.sleep(0.05)
    assert not await queue.request_sync(redis, *SUB, window=PATIENT)
    assert await jobs(redis) == first


# ---------------------------------------------------------------------- trailing edge


async def test_a_change_while_a_sync_runs_queues_one_follow_up_after_the_quiet_period(
    redis: ArqRedis,
) -> None:
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    lead = await waiting_job(redis)
    await start(redis, lead)

    before = now_ms()
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    assert not await queue.request_sync(redis, *SUB, window=PATIENT)
    follow_up = await waiting_job(redis)
    assert follow_up != lead
    assert (await jobs(redis))[follow_up] >= before + PATIENT.quiet * 1000


async def test_a_change_soon_after_another_waits_for_quiet_even_once_the_sync_ended(
    redis: ArqRedis,
) -> None:
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    lead = await waiting_job(redis)
    await start(redis, lead)
    await finish(redis, lead)

    before = now_ms()
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    [score] = (await jobs(redis)).values()
    assert score >= before + PATIENT.quiet * 1000


async def test_a_change_after_the_quiet_period_is_a_leading_edge_again(redis: ArqRedis) -> None:
    brief = queue.SyncWindow(quiet=0.2, max_wait=60.0)
    assert await queue.request_sync(redis, *SUB, window=brief)
    lead = await waiting_job(redis)
    await start(redis, lead)
    await finish(redis, lead)
    await asyncio.sleep(0.3)

    assert await queue.request_sync(redis, *SUB, window=brief)
    [score] = (await jobs(redis)).values()
    assert score <= now_ms()


async def test_each_change_pushes_the_follow_up_to_the_quiet_period_after_it(
    redis: ArqRedis,
) -> None:
    window = queue.SyncWindow(quiet=2.0, max_wait=60.0)
    assert await queue.request_sync(redis, *SUB, window=window)
    await start(redis, await waiting_job(redis))
    assert await queue.request_sync(redis, *SUB, window=window)
    follow_up = await waiting_job(redis)
    first = (await jobs(redis))[follow_up]

    await asyncio.sleep(0.1)
    before = now_ms()
    assert not await queue.request_sync(redis, *SUB, window=window)
    pushed = (await jobs(redis))[follow_up]
    assert pushed >= before + 2000
    assert pushed > first


async def test_the_follow_up_never_waits_past_the_max_wait_after_its_first_change(
    redis: ArqRedis,
) -> None:
    window = queue.SyncWindow(quiet=5.0, max_wait=0.3)
    assert await queue.request_sync(redis, *SUB, window=window)
    await start(redis, await waiting_job(redis))
    before = now_ms()
    assert await queue.request_sync(redis, *SUB, window=window)
    follow_up = await waiting_job(redis)
    after = now_ms()
    for _ in range(5):
        await asyncio.sleep(0.05)
        assert not await queue.request_sync(redis, *SUB, window=window)
    score = (await jobs(redis))[follow_up]
    assert before + 300 <= score <= after + 300


@pytest.mark.parametrize("max_wait", [60.0, 1.8])
async def test_the_quiet_period_counts_from_registration_the_max_wait_from_receipt(
    redis: ArqRedis, max_wait: float
) -> None:
    # A change received 1.5 s ago whose commit ended only now: the follow-up waits the
    # quiet period (2 s) after now, so a change of the same burst still being committed
    # elsewhere is covered; but never past the maximum wait after the change's receipt.
    window = queue.SyncWindow(quiet=2.0, max_wait=max_wait)
    assert await queue.request_sync(redis, *SUB, window=window)
    await start(redis, await waiting_job(redis))
    received = datetime.now(UTC) - timedelta(seconds=1.5)
    before = now_ms()

    assert await queue.request_sync(redis, *SUB, window=window, changed_at=received)

    after = now_ms()
    score = (await jobs(redis))[await waiting_job(redis)]
    due = int(received.timestamp() * 1000) + int(max_wait * 1000)
    assert min(before + 2000, due) - 1 <= score <= min(after + 2000, due) + 1


async def test_a_retry_takes_over_the_follow_up_waiting_for_its_scope(redis: ArqRedis) -> None:
    failing, follow_up = await a_retry_with_a_follow_up_waiting(redis)

    await start(redis, failing)  # the retry fetches after every change the follow-up covers

    assert follow_up not in await jobs(redis)
    assert await queue.request_sync(redis, *SUB, window=PATIENT)  # the next change: a new one


async def test_a_dropped_follow_up_a_worker_picked_meanwhile_does_nothing(
    redis: ArqRedis,
) -> None:
    # A worker reads a due job's id from the queue, then marks it in progress: a retry that
    # starts in between drops the job, yet the worker runs it. It must find its job (arq
    # would count a vanished one as failed) and stand down without a fetch.
    failing, follow_up = await a_retry_with_a_follow_up_waiting(redis)

    assert await queue.sync_started(redis, *SUB, job_id=failing, ttl=60)  # the retry

    assert follow_up not in await jobs(redis)
    assert await redis.exists(job_key_prefix + follow_up)  # for the worker that holds it
    assert 0 < await redis.pttl(job_key_prefix + follow_up) <= queue.SUPERSEDED_TTL_MS
    assert not await queue.sync_started(redis, *SUB, job_id=follow_up, ttl=60)
    assert await redis.get(queue.syncing_key(*SUB)) == failing.encode()  # still the retry's


async def test_a_follow_up_a_worker_already_took_is_left_to_run(redis: ArqRedis) -> None:
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    failing = await waiting_job(redis)
    await start(redis, failing)
    assert await queue.request_sync(redis, *SUB, window=PATIENT)
    follow_up = await waiting_job(redis)
    await redis.set(in_progress_key_prefix + follow_up, b"1", px=60_000)

    await start(redis, failing)

    assert follow_up in await jobs(redis)
    assert await redis.exists(job_key_prefix + follow_up)


async def test_a_finished_sync_clears_only_its_own_marker(redis: ArqRedis) -> None:
    await queue.sync_started(redis, *SUB, job_id="sync:a", ttl=60)
    await queue.sync_started(redis, *SUB, job_id="sync:b", ttl=60)
    await queue.sync_finished(redis, *SUB, job_id="sync:a")
    assert await redis.get(queue.syncing_key(*SUB)) == b"sync:b"
    await queue.sync_finished(redis, *SUB, job_id="sync:b")
    assert not await redis.exists(queue.syncing_key(*SUB))


# ---------------------------------------------------------------------- orphans


async def test_an_orphaned_flag_is_replaced_and_a_young_one_is_not(redis: ArqRedis) -> None:
    young, old = ("subscription", "young"), ("subscription", "old")
    for scope, ttl in [(young, queue.QUEUED_FLAG_TTL_S + 60), (old, queue.QUEUED_FLAG_TTL_S - 10)]:
        await redis.set(queue.queued_key(*scope), f"sync:{scope[1]}:never-enqueued", ex=ttl)

    assert not await queue.request_sync(redis, *young)
    assert await queue.request_sync(redis, *old)
    assert list(await jobs(redis)) == [await waiting_job(redis, *old)]
