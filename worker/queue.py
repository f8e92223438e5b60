"""The only module that knows job names, job ids and the Redis keys that coalesce syncs.

Each scope's syncs are coalesced with a leading and a trailing edge and a maximum wait,
without losing a change:

1. A change on a quiet scope (no change for SYNC_QUIET_SECONDS, no sync of it waiting or
   running) enqueues a sync that runs at once: a lone change is as fresh as it can be.
2. A scope has at most one sync job *waiting* at any time (the `queued` flag names it).
   A change while one waits is covered by it, because a job clears the flag before it
   fetches: its fetch starts after every change that found the flag.
3. A change while the scope is busy (a sync running, or another change less than
   SYNC_QUIET_SECONDS ago) and no job waits enqueues ONE follow-up. Each later change
   pushes it back to SYNC_QUIET_SECONDS after itself, but never past
   SYNC_MAX_WAIT_SECONDS after the first change it covers (arq keeps a job's start time
   as its score in the queue's sorted set; the script moves that score).

The quiet period counts from when a change is registered here (after the receiver
committed it), the maximum wait from when the receiver got the first change it covers.
A follow-up that started before a change its burst had already received (still being
committed) would cost a third call, so the quiet period waits for the registration; the
maximum wait counts from receipt so that a slow commit cannot stretch how stale the mirror
may get. The times only decide when a sync runs; that it covers a change comes from the
flag alone.

So a burst costs one list call at its start plus one per SYNC_MAX_WAIT_SECONDS it lasts
(two for a burst shorter than that), and after its last change the mirror reflects a
fetch that started after it. Every decision is one Lua script, atomic in Redis: the flag,
the timestamps and the job (arq's own job key and queue entry) are written together.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis, RedisSettings
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job

from worker.config import DEFAULT_SYNC_MAX_WAIT_SECONDS, DEFAULT_SYNC_QUIET_SECONDS, Settings

QUEUE_NAME = "seat-sync:queue"
# A flag whose job vanished (Redis lost data, or a process of an older release died
# between setting the flag and enqueueing) must not block its scope forever.
QUEUED_FLAG_TTL_S = 300
ORPHAN_GRACE_S = 5

SYNC_SCOPE = "sync_scope"
SWEEP_INBOX = "sweep_inbox"
RESYNC_ALL = "resync_all"
REMIND_EXPIRING = "remind_expiring"
REMIND_GATE_KEY = "seat-sync:gate:remind"


@dataclass(frozen=True)
class SyncWindow:
    """How one scope's syncs are coalesced: SYNC_QUIET_SECONDS and SYNC_MAX_WAIT_SECONDS."""

    quiet: float = DEFAULT_SYNC_QUIET_SECONDS
    """A follow-up starts once the scope had no change for this long..."""
    max_wait: float = DEFAULT_SYNC_MAX_WAIT_SECONDS
    """...and never later than this after the first change it covers."""

    @classmethod
    def of(cls, settings: Settings) -> SyncWindow:
        return cls(quiet=settings.sync_quiet_seconds, max_wait=settings.sync_max_wait_seconds)


def redis_settings(url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    settings.conn_retries = 2
    settings.conn_retry_delay = 1
    return settings


def queued_key(kind: str, scope_id: str) -> str:
    """The job id of the scope's waiting sync, while one waits."""
    return f"seat-sync:queued:{kind}:{scope_id}"


def due_key(kind: str, scope_id: str) -> str:
    """While a follow-up waits: the latest time it may start (ms), first change + max wait."""
    return f"seat-sync:due:{kind}:{scope_id}"


def changed_key(kind: str, scope_id: str) -> str:
    """Exists for SYNC_QUIET_SECONDS after each change of the scope."""
    return f"seat-sync:changed:{kind}:{scope_id}"


def syncing_key(kind: str, scope_id: str) -> str:
    """The job id of a sync of the scope that is running (expires if its worker dies)."""
    return f"seat-sync:syncing:{kind}:{scope_id}"


def _now_ms() -> int:
    return int(time.time() * 1000)


async def request_sync(
    redis: ArqRedis,
    kind: str,
    scope_id: str,
    *,
    trigger: str = "webhook",
    window: SyncWindow | None = None,
    changed_at: datetime | None = None,
) -> bool:
    """Make sure a sync of the scope will fetch after now (see the module's rules). True
    when a job was enqueued, False when one already waits (it covers this request).

    `changed_at` is when the change was received (default: now). The maximum wait counts
    from it, the quiet period from now (the module's docstring says why); whatever the
    times, a fetch starts after this call."""
    window = window or SyncWindow()
    job_id = f"sync:{kind}:{scope_id}:{uuid.uuid4().hex}"
    now = _now_ms()
    changed = now if changed_at is None else min(now, int(changed_at.timestamp() * 1000))
    payload = serialize_job(
        SYNC_SCOPE,
        (),
        {"kind": kind, "scope_id": scope_id, "trigger": trigger},
        None,
        now,
        serializer=redis.job_serializer,
    )
    claim = redis.register_script(_REQUEST_SYNC)
    enqueued = await claim(
        keys=[
            queued_key(kind, scope_id),
            due_key(kind, scope_id),
            changed_key(kind, scope_id),
            syncing_key(kind, scope_id),
            QUEUE_NAME,
        ],
        args=[
            job_id,
            now,
            int(window.quiet * 1000),
            int(window.max_wait * 1000),
            QUEUED_FLAG_TTL_S + int(window.max_wait) + 1,
            ORPHAN_GRACE_S,
            job_key_prefix,
            payload,
            expires_extra_ms,
            changed,
        ],
    )
    return bool(int(enqueued))


# KEYS: the queued flag, the follow-up's due time, the changed marker, the syncing marker,
# arq's queue. ARGV: new job id, now (ms), quiet (ms), max wait (ms), flag TTL (s), orphan
# grace (s), arq's job key prefix, the serialized job, arq's job expiry margin (ms), when
# the change was received (ms, <= now).
# Returns 1 when it enqueued a job, 0 when a waiting job covers the request.
# A flag whose job key is gone and that is older than the grace is an orphan (a job clears
# its flag when it starts and keeps its job key until it ends) and is replaced.
_REQUEST_SYNC = """
local now, quiet, max_wait = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local changed = tonumber(ARGV[10])
local busy = redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1
if quiet > 0 and redis.call('PTTL', KEYS[3]) < quiet then
  redis.call('SET', KEYS[3], changed, 'PX', quiet)
end
local flagged = redis.call('GET', KEYS[1])
if flagged then
  local orphan = string.sub(flagged, 1, 5) == 'sync:'
    and redis.call('EXISTS', ARGV[7] .. flagged) == 0
    and redis.call('TTL', KEYS[1]) <= tonumber(ARGV[5]) - tonumber(ARGV[6])
  if not orphan then
    local due = tonumber(redis.call('GET', KEYS[2]) or '0')
    if due > 0 then
      local at = math.min(now + quiet, due)
      local score = redis.call('ZSCORE', KEYS[5], flagged)
      if score and tonumber(score) < at then
        redis.call('ZADD', KEYS[5], 'XX', at, flagged)
      end
    end
    return 0
  end
end
local at = now
if busy then
  at = math.max(now, math.min(now + quiet, changed + max_wait))
  redis.call('SET', KEYS[2], changed + max_wait, 'EX', ARGV[5])
else
  redis.call('DEL', KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[5])
redis.call('SET', ARGV[7] .. ARGV[1], ARGV[8], 'PX', at - now + tonumber(ARGV[9]))
redis.call('ZADD', KEYS[5], at, ARGV[1])
return 1
"""


async def sync_started(
    redis: ArqRedis, kind: str, scope_id: str, *, job_id: str, ttl: float
) -> bool:
    """Called by a sync job before it fetches: later changes need a follow-up, and the
    scope is busy until `sync_finished` (or `ttl` seconds, should the worker die). A job
    of the scope still waiting is dropped: this fetch starts after every change it covers.

    False when this job is one that was dropped so (a worker had already picked it from
    the queue when another job of its scope started): it must do nothing."""
    start = redis.register_script(_SYNC_STARTED)
    started = await start(
        keys=[
            queued_key(kind, scope_id),
            due_key(kind, scope_id),
            syncing_key(kind, scope_id),
            QUEUE_NAME,
        ],
        args=[
            job_id,
            int(ttl * 1000),
            job_key_prefix,
            in_progress_key_prefix,
            SUPERSEDED_PREFIX,
            SUPERSEDED_TTL_MS,
        ],
    )
    return bool(int(started))


# A dropped job keeps its arq job key (and gets this marker) for this long: a worker that
# read its id from the queue just before it was dropped still finds the job, runs it, and
# the job ends at once instead of arq counting a vanished job as failed ("expired").
SUPERSEDED_PREFIX = "seat-sync:superseded:"
SUPERSEDED_TTL_MS = 60_000

# KEYS: the queued flag, the due time, the syncing marker, arq's queue. ARGV: this job's
# id, the marker's TTL (ms), arq's job key prefix, arq's in-progress key prefix, the
# superseded marker prefix, its TTL (ms). Returns 0 when this job was itself dropped.
# Another job waits only when this one is a retry (its flag was cleared at its first try);
# one a worker has already taken is left to run.
_SYNC_STARTED = """
if redis.call('EXISTS', ARGV[5] .. ARGV[1]) == 1 then return 0 end
local flagged = redis.call('GET', KEYS[1])
if flagged and flagged ~= ARGV[1] and redis.call('EXISTS', ARGV[4] .. flagged) == 0 then
  redis.call('ZREM', KEYS[4], flagged)
  redis.call('PEXPIRE', ARGV[3] .. flagged, ARGV[6])
  redis.call('SET', ARGV[5] .. flagged, 1, 'PX', ARGV[6])
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
return 1
"""


async def sync_finished(redis: ArqRedis, kind: str, scope_id: str, *, job_id: str) -> None:
    """Called by a sync job when it ends, however it ends: the scope is no longer busy
    because of it (a change from now on is a leading edge once the scope is quiet)."""
    finish = redis.register_script(_SYNC_FINISHED)
    await finish(keys=[syncing_key(kind, scope_id)], args=[job_id])


_SYNC_FINISHED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""


async def enqueue_unique(redis: ArqRedis, function: str, **kwargs: Any) -> bool:
    """Enqueue a singleton job (sweep, full resync) unless one is already waiting."""
    job = await redis.enqueue_job(
        function, _job_id=f"{function}:singleton", _queue_name=QUEUE_NAME, **kwargs
    )
    return job is not None
