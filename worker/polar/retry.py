"""The one retry policy for Polar calls: which failures are worth another try, how long to wait.

Transient (retry): `TransientError` (5xx, timeout, network failure, a body that is not JSON)
and `RateLimitedError` (429: wait the retry-after Polar sent, plus up to
RATE_LIMIT_SPREAD_S so that a fleet does not come back in one burst). Every other
`PolarError` is permanent until a person changes something (token, scopes, POLAR_API_URL)
or is Polar's final word ("not found"): another try cannot help.

Backoff is exponential with jitter: the wait after the n-th failed attempt is drawn
uniformly from [c/2, c], c = min(cap, base * 2**n). The random half spreads the retries of
many jobs apart; the floor keeps two promises however the draws fall: n attempts outlast
a known span (SYNC_MAX_TRIES=8 with base 1 s: 2 to 4 minutes), and a job waits at least
base, 2 base, 4 base ... between calls, so an outage never turns into a storm of retries.
("Full jitter", a draw from [0, c], would break both.)

One policy, three users:
- arq jobs: `raise Retry(defer=retry_delay(exc, job_try))`, the wait happens in Redis;
- the full resync and the CLI: `await call_with_retries(call)`, the wait happens here,
  through an injectable `sleep`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from worker.polar.errors import PolarError, RateLimitedError, TransientError

T = TypeVar("T")

# The first wait is 1-2 s (times `base`); SYNC_RETRY_BASE_SECONDS sets `base` for jobs and the
# full resync.
BASE_S = 1.0
# No wait longer than 4 minutes (2-4 min): a job still failing then is left to the next
# webhook, the inbox sweep or the full resync.
CAP_S = 240.0
# Attempts of a call made in process (the CLI); the first attempt counts.
ATTEMPTS = 6
# Added to a 429's retry-after, drawn uniformly from [0, RATE_LIMIT_SPREAD_S].
RATE_LIMIT_SPREAD_S = 2.0

TRANSIENT: tuple[type[PolarError], ...] = (TransientError, RateLimitedError)

Sleep = Callable[[float], Awaitable[None]]
OnRetry = Callable[[PolarError, int, float], None]


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed without anyone changing anything."""
    return isinstance(exc, TRANSIENT)


def backoff(
    attempt: int,
    *,
    base: float = BASE_S,
    cap: float = CAP_S,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after the `attempt`-th failure (1 = the first): from [c/2, c],
    c = min(cap, base * 2**attempt)."""
    ceiling = min(cap, base * 2.0 ** max(1, attempt))
    return ceiling / 2 + ceiling / 2 * rng()


def retry_delay(
    exc: BaseException,
    attempt: int,
    *,
    base: float = BASE_S,
    cap: float = CAP_S,
    rng: Callable[[], float] = random.random,
) -> float | None:
    """Seconds to wait before trying again after `exc` ended the `attempt`-th try, or None
    when `exc` is not transient. A 429's retry-after is honoured whatever the cap."""
    if isinstance(exc, RateLimitedError):
        return exc.retry_after + RATE_LIMIT_SPREAD_S * rng()
    if is_transient(exc):
        return backoff(attempt, base=base, cap=cap, rng=rng)
    return None


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int = ATTEMPTS,
    base: float = BASE_S,
    cap: float = CAP_S,
    sleep: Sleep = asyncio.sleep,
    on_retry: OnRetry | None = None,
) -> T:
    """`await call()`, again after each transient PolarError, at most `attempts` times in all.

    A permanent PolarError, or the transient one of the last attempt, propagates as raised;
    so does anything that is not a PolarError. `on_retry(error, attempt, delay)` is told
    before each wait (the CLI says what it is waiting for)."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    attempt = 1
    while True:
        try:
            return await call()
        except PolarError as exc:
            delay = retry_delay(exc, attempt, base=base, cap=cap)
            if delay is None or attempt >= attempts:
                raise
            if on_retry is not None:
                on_retry(exc, attempt, delay)
        await sleep(delay)
        attempt += 1
