"""One Polar rate budget for the whole fleet, shared through Redis, with priority lanes.

A sliding window log (not a fixed window) so that however Polar's own fixed window is
aligned, no 60 s span ever sees more than POLAR_REQUESTS_PER_MINUTE of our calls. Lower
lanes leave a reserve that grows with recent webhook traffic, so a full resync never
starves webhook syncs yet uses nearly the whole budget when webhooks are quiet.
A 429 pauses every process until its retry-after has passed.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from worker.polar.errors import Lane

KEY_LOG = "seat-sync:budget:log"
KEY_WEBHOOK_LOG = "seat-sync:budget:log:webhook"
KEY_PAUSE = "seat-sync:budget:paused-until"
WINDOW_MS = 60_000

# Lower lanes leave room for webhook-driven syncs: a floor of the window, or a multiple of
# what webhook syncs actually used in the last window, whichever is larger. So a full
# resync runs near the whole budget when webhooks are quiet, and yields when they are not.
LANE_RESERVE: dict[str, tuple[float, int]] = {
    # lane: (floor as a share of the window, multiple of recent webhook-lane calls)
    "interactive": (0.0, 0),
    "webhook": (0.0, 0),
    "reminder": (0.05, 1),
    "resync": (0.05, 2),
}
TOP_LANES = ("webhook", "interactive")

# KEYS: all-calls log, webhook-lane log, pause key.
# ARGV: limit, window_ms, member, reserve floor (calls), reserve multiple, is-top-lane.
# Returns 0 when a slot was taken, else milliseconds to wait before asking again.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local paused = tonumber(redis.call('GET', KEYS[3]) or '0')
if paused > now then return paused - now end
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[1])
local reserve = tonumber(ARGV[4])
local recent = redis.call('ZCARD', KEYS[2]) * tonumber(ARGV[5])
if recent > reserve then reserve = recent end
if reserve > limit - 1 then reserve = limit - 1 end
if used < limit - reserve then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window * 2)
  if ARGV[6] == '1' then
    redis.call('ZADD', KEYS[2], now, ARGV[3])
    redis.call('PEXPIRE', KEYS[2], window * 2)
  end
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(oldest[2]) + window - now
if wait < 1 then wait = 1 end
if wait > 250 and reserve > 0 then wait = 250 end
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

    async def acquire(self, lane: Lane) -> None:
        """Wait until this process may make one more call in `lane`."""
        share, multiple = LANE_RESERVE.get(lane, (0.0, 0))
        floor = int(self.per_minute * share)
        top = "1" if lane in TOP_LANES else "0"
        member = uuid.uuid4().hex
        while True:
            wait_ms = int(
                await self._acquire(
                    keys=[KEY_LOG, KEY_WEBHOOK_LOG, KEY_PAUSE],
                    args=[self.per_minute, self._window_ms, member, floor, multiple, top],
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
