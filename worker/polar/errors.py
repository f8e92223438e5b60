"""Polar's failures, classified once at the HTTP edge, and the budget lanes calls are made in.

A leaf module: it imports nothing from `worker`, so every layer may name these types.
"""

from __future__ import annotations

from typing import Literal

# Who a call is for; the shared rate budget keeps room for the higher lanes.
Lane = Literal["webhook", "reminder", "resync", "interactive"]

# What every misconfiguration message ends with; `seat-sync status` looks for it.
CHECK_CONFIGURATION = "check POLAR_API_URL and POLAR_API_VERSION"


class PolarError(Exception):
    """Base of every classified Polar failure. Messages never contain the token. Which ones
    are worth another try is decided in one place, `worker.polar.retry`."""

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None):
        super().__init__(message)
        self.status = status
        self.error = error


class RateLimitedError(PolarError):
    """429: the organisation's budget is spent; wait `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"Polar rate limit reached; retry after {retry_after:g}s", status=429)
        self.retry_after = retry_after


class TransientError(PolarError):
    """5xx, network failure, timeout or a body that is not JSON: worth retrying with backoff."""


class NotFoundError(PolarError):
    """404 `ResourceNotFound`: Polar says the subscription, order or seat does not exist
    (or is not ours). The only answer that means "gone"."""


class PolarMisconfiguredError(PolarError):
    """404 without an error code: Polar's router found no such route, which is what a wrong
    POLAR_API_URL or an unknown or retired POLAR_API_VERSION gets. It says nothing about the
    subscription or order asked for, and lasts until the configuration is fixed."""


class AuthError(PolarError):
    """401/403: bad token, missing scope, or seat-based pricing not enabled."""


class InvalidRequestError(PolarError):
    """400/422: Polar refused the request; `error` holds Polar's error class name."""
