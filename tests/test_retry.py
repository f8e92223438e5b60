"""The one retry policy for Polar calls: what is transient, how long it waits, when it stops."""

from __future__ import annotations

import random

import pytest
from pydantic import SecretStr

from tests.support.settings import SIM_TOKEN
from worker.polar.client import PolarClient
from worker.polar.errors import (
    AuthError,
    InvalidRequestError,
    NotFoundError,
    PolarError,
    PolarMisconfiguredError,
    RateLimitedError,
    TransientError,
)
from worker.polar.retry import (
    CAP_S,
    RATE_LIMIT_SPREAD_S,
    backoff,
    call_with_retries,
    is_transient,
    retry_delay,
)
from worker.simulator.server import SimulatedPolar


class Sleeps:
    """An injected sleep that records the waits and takes no time."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class Flaky:
    """A call that raises the given errors in turn, then answers "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_server_failures_timeouts_and_rate_limits_are_transient() -> None:
    assert is_transient(TransientError("list seats: Polar answered 503", status=503))
    assert is_transient(TransientError("list seats: Polar timed out (ReadTimeout)"))
    assert is_transient(RateLimitedError(3))


@pytest.mark.parametrize(
    "error",
    [
        AuthError("bad token", status=401),
        NotFoundError("gone", status=404, error="ResourceNotFound"),
        PolarMisconfiguredError("no such route", status=404),
        InvalidRequestError("refused", status=422),
        PolarError("unclassified"),
        ValueError("not Polar at all"),
    ],
)
def test_everything_else_is_permanent(error: BaseException) -> None:
    assert not is_transient(error)
    assert retry_delay(error, 1) is None


def test_backoff_waits_between_half_and_all_of_a_doubling_ceiling() -> None:
    draws = random.Random(7)
    for attempt in range(1, 8):
        ceiling = 2.0**attempt * 0.5
        assert backoff(attempt, base=0.5, rng=lambda: 0.0) == ceiling / 2
        assert backoff(attempt, base=0.5, rng=lambda: 1.0) == ceiling
        for _ in range(200):
            assert ceiling / 2 <= backoff(attempt, base=0.5, rng=draws.random) <= ceiling


def test_backoff_draws_are_spread_not_fixed() -> None:
    draws = {round(backoff(3), 6) for _ in range(50)}
    assert len(draws) > 40
    assert min(draws) >= 4.0
    assert max(draws) <= 8.0


def test_backoff_never_exceeds_the_cap() -> None:
    assert backoff(30, rng=lambda: 1.0) == CAP_S
    assert backoff(30, rng=lambda: 0.0) == CAP_S / 2
    assert backoff(5, cap=10.0, rng=lambda: 1.0) == 10.0


def test_rate_limit_waits_its_retry_after_plus_a_spread_even_beyond_the_cap() -> None:
    long = RateLimitedError(CAP_S * 2)
    assert retry_delay(long, 1, rng=lambda: 0.0) == CAP_S * 2
    assert retry_delay(long, 1, rng=lambda: 1.0) == CAP_S * 2 + RATE_LIMIT_SPREAD_S
    assert retry_delay(RateLimitedError(3), 5, rng=lambda: 0.5) == 3 + RATE_LIMIT_SPREAD_S / 2


async def test_transient_failures_are_retried_until_the_call_answers() -> None:
    call = Flaky(TransientError("503", status=503), TransientError("timeout"))
    sleep = Sleeps()
    assert await call_with_retries(call, attempts=3, base=0.5, sleep=sleep) == "done"
    assert call.calls == 3
    assert len(sleep.waits) == 2
    assert 0.5 <= sleep.waits[0] <= 1.0
    assert 1.0 <= sleep.waits[1] <= 2.0


async def test_a_429_is_retried_after_its_retry_after() -> None:
    call = Flaky(RateLimitedError(7))
    sleep = Sleeps()
    assert await call_with_retries(call, sleep=sleep) == "done"
    assert len(sleep.waits) == 1
    assert 7 <= sleep.waits[0] <= 7 + RATE_LIMIT_SPREAD_S


async def test_gives_up_after_the_last_attempt_with_the_last_error() -> None:
    errors = [TransientError(f"503 number {n}", status=503) for n in range(1, 6)]
    call = Flaky(*errors)
    sleep = Sleeps()
    with pytest.raises(TransientError) as raised:
        await call_with_retries(call, attempts=4, sleep=sleep)
    assert raised.value is errors[3]
    assert call.calls == 4
    assert len(sleep.waits) == 3


async def test_a_permanent_error_is_raised_at_once() -> None:
    call = Flaky(AuthError("bad token", status=401))
    sleep = Sleeps()
    with pytest.raises(AuthError):
        await call_with_retries(call, sleep=sleep)
    assert call.calls == 1
    assert sleep.waits == []


async def test_an_error_that_is_not_polars_is_not_retried() -> None:
    call = Flaky(RuntimeError("a bug"))
    with pytest.raises(RuntimeError):
        await call_with_retries(call, sleep=Sleeps())
    assert call.calls == 1


async def test_on_retry_is_told_the_error_attempt_and_wait() -> None:
    first, second = TransientError("503", status=503), RateLimitedError(2)
    told: list[tuple[PolarError, int, float]] = []
    sleep = Sleeps()
    await call_with_retries(
        Flaky(first, second),
        sleep=sleep,
        on_retry=lambda error, attempt, delay: told.append((error, attempt, delay)),
    )
    assert [(error, attempt) for error, attempt, _ in told] == [(first, 1), (second, 2)]
    assert [delay for _, _, delay in told] == sleep.waits


async def test_polar_answering_503_is_retried_through_the_real_client(
    sim: SimulatedPolar,
) -> None:
    """Classified at the HTTP edge, retried by the policy: two 503s, then the seats."""
    sub = sim.state.create_subscription(seats=2)
    sim.state.assign(subscription_id=sub["id"], email="ann@example.com")
    sim.add_fault("/v1/customer-seats", status=503, times=2, method="GET")
    sleep = Sleeps()
    async with PolarClient(sim.base_url, SecretStr(SIM_TOKEN)) as polar:
        listed = await call_with_retries(
            lambda: polar.list_seats(subscription_id=sub["id"]), sleep=sleep
        )
        assert polar.calls == 3
    assert [s.email for s in listed.seats] == ["ann@example.com"]
    assert len(sleep.waits) == 2
