"""The only module that knows job names, job ids and the Redis keys that coalesce syncs.

Coalescing without loss: a scope has at most one sync job *waiting* at any time (the
`queued` flag, set with NX). A job clears the flag before it fetches, so an event recorded
while the job runs enqueues exactly one follow-up job, whose fetch starts after that event.
Hence: after the last event of a burst the mirror reflects a fetch that started after it.

Frugal too: a follow-up waits until SYNC_MIN_INTERVAL_SECONDS after the previous sync of
the scope started (a deferred job, still started after the event), so a burst costs one
list call per scope plus at most one per interval while it lasts — two for a burst shorter
than the interval — and one hot scope cannot spend the organisation's whole rate budget.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix

QUEUE_NAME = "seat-sync:queue"
QUEUED_FLAG_TTL_S = 300  # a lost job (Redis restarted between flag and enqueue) self-heals
ORPHAN_GRACE_S = 5

SYNC_SCOPE = "sync_scope"
SWEEP_INBOX = "sweep_inbox"
RESYNC_ALL = "resync_all"
REMIND_EXPIRING = "remind_expiring"
REMIND_GATE_KEY = "seat-sync:gate:remind"


def redis_settings(url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    settings.conn_retries = 2
    settings.conn_retry_delay = 1
    return settings


def queued_key(kind: str, scope_id: str) -> str:
    return f"seat-sync:queued:{kind}:{scope_id}"


def next_allowed_key(kind: str, scope_id: str) -> str:
    return f"seat-sync:next-sync-at:{kind}:{scope_id}"


def _now_ms() -> int:
    return int(time.time() * 1000)


async def request_sync(
    redis: ArqRedis, kind: str, scope_id: str, *, trigger: str = "webhook"
) -> bool:
    """Make sure a sync of the scope will start after now. True when a job was enqueued,
    False when one is already waiting (it will start later, so it covers this request)."""
    key = queued_key(kind, scope_id)
    job_id = f"sync:{kind}:{scope_id}:{uuid.uuid4().hex}"
    claim = redis.register_script(_CLAIM_FLAG)
    allowed_at = int(
        await claim(
            keys=[key, next_allowed_key(kind, scope_id)],
            args=[job_id, QUEUED_FLAG_TTL_S, ORPHAN_GRACE_S, job_key_prefix],
        )
    )
    if allowed_at < 0:
        return False
    try:
        wait_ms = allowed_at - _now_ms() if allowed_at > 0 else 0
        await redis.enqueue_job(
            SYNC_SCOPE,
            kind=kind,
            scope_id=scope_id,
            trigger=trigger,
            _job_id=job_id,
            _queue_name=QUEUE_NAME,
            _defer_by=timedelta(milliseconds=wait_ms) if wait_ms > 0 else None,
        )
    except BaseException:
        await _forget_flag(redis, key)
        raise
    return True


# One round trip per request (the receiver's hot path). KEYS: the queued flag, the scope's
# next-allowed time. ARGV: job id, flag TTL (s), orphan grace (s), arq's job key prefix.
# Returns -1 when a job is already waiting, else the next-allowed time in ms (0: none).
# A process that died between setting the flag and enqueueing leaves a flag with no job,
# which would block the scope until its TTL: a job clears the flag when it starts and keeps
# its job key until it ends, so "flag older than the grace, its job key gone" is an orphan
# and is replaced.
_CLAIM_FLAG = """
local function allowed()
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return allowed() end
local flagged = redis.call('GET', KEYS[1])
if not flagged then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return allowed()
end
if string.sub(flagged, 1, 5) ~= 'sync:' then return -1 end
if redis.call('EXISTS', ARGV[4] .. flagged) == 1 then return -1 end
if redis.call('TTL', KEYS[1]) > tonumber(ARGV[2]) - tonumber(ARGV[3]) then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return allowed()
"""


async def _forget_flag(redis: ArqRedis, key: str) -> None:
    try:
        await redis.delete(key)
    except Exception:  # Redis is probably down; the flag's TTL expires it
        return


async def sync_started(
    redis: ArqRedis, kind: str, scope_id: str, *, min_interval: float = 0.0
) -> None:
    """Called by the job before it fetches: later events must enqueue a follow-up, which
    may not start before `min_interval` seconds from now."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(queued_key(kind, scope_id))
        if min_interval > 0:
            interval_ms = int(min_interval * 1000)
            pipe.set(next_allowed_key(kind, scope_id), _now_ms() + interval_ms, px=interval_ms)
        await pipe.execute()


async def enqueue_unique(redis: ArqRedis, function: str, **kwargs: Any) -> bool:
    """Enqueue a singleton job (sweep, full resync) unless one is already waiting."""
    job = await redis.enqueue_job(
        function, _job_id=f"{function}:singleton", _queue_name=QUEUE_NAME, **kwargs
    )
    return job is not None
