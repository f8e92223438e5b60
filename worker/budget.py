"""One Polar rate budget for the whole fleet, shared through Redis, with priority lanes.

A sliding window log (not a fixed window) so that however Polar's own fixed window is
aligned, no 60 s span ever sees more than POLAR_REQUESTS_PER_MINUTE of our calls. Lower
lanes may only fill part of the window, so a full resync never starves webhook syncs.
A 429 pauses every process until its retry-after has passed.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from worker.polar import Lane

KEY_LOG = "seat-sync:budget:log"
KEY_PAUSE = "seat-sync:budget:paused-until"
WINDOW_MS = 60_000

# Share of the per-minute budget each lane may fill; the rest stays free for higher lanes.
LANE_SHARE: dict[str, float] = {
    "interactive": 1.0,
    "webhook": 1.0,
    "reminder": 0.85,
    "resync": 0.7,
}

# KEYS[1] log zset, KEYS[2] pause key; ARGV: limit, window_ms, member.
# Returns 0 when a slot was taken, else milliseconds to wait before asking again.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then return paused - now end
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window * 2)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
return wait
"""

_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return until_ms
"""

_USED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
return redis.call('ZCARD', KEYS[1])
"""


class RedisBudget:
    """The budget every PolarClient of the deployment spends from."""

    def __init__(self, redis: Any, per_minute: int, *, window_ms: int = WINDOW_MS) -> None:
        self._redis = redis
        self.per_minute = per_minute
        self._window_ms = window_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._pause = redis.register_script(_PAUSE)
        self._used = redis.register_script(_USED)

    def lane_limit(self, lane: Lane) -> int:
        return max(1, int(self.per_minute * LANE_SHARE.get(lane, 1.0)))

    async def acquire(self, lane: Lane) -> None:
        """Wait until this process may make one more call in `lane`."""
        limit = self.lane_limit(lane)
        member = uuid.uuid4().hex
        while True:
            wait_ms = int(
                await self._acquire(
                    keys=[KEY_LOG, KEY_PAUSE], args=[limit, self._window_ms, member]
                )
            )
            if wait_ms <= 0:
                return
            await asyncio.sleep(min(wait_ms, 5_000) / 1000)

    async def pause(self, seconds: float) -> None:
        """Polar said 429: nobody in the fleet calls again before `seconds` have passed."""
        await self._pause(keys=[KEY_PAUSE], args=[int(seconds * 1000)])

    async def used(self) -> int:
        return int(await self._used(keys=[KEY_LOG], args=[self._window_ms]))
