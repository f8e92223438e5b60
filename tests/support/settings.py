"""The test run's settings: where the shared PostgreSQL and Redis are, which database
backends to run on, the simulated Polar's token and the receiver's endpoint secret, and
the worker `Settings` built from them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from worker.config import Settings

if TYPE_CHECKING:
    from worker.simulator.server import SimulatedPolar

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
BACKENDS = [
    b.strip()
    for b in os.environ.get("SEAT_SYNC_TEST_DATABASES", "sqlite,postgresql").split(",")
    if b.strip()
]
SIM_TOKEN = "polar_oat_simulated"
# An endpoint secret as Polar issues it today: `whsec_` + base64 of 32 random bytes, signed
# with the decoded bytes (Standard Webhooks). Fixed, so a failing run can be replayed.
WEBHOOK_SECRET = "whsec_c2VhdC1zeW5jIHRlc3RzOiBhIDMyLWJ5dGUga2V5ISE="


def make_settings(database_url: str, sim: SimulatedPolar | None = None, **extra: Any) -> Settings:
    """Settings for the worker under test; without `sim`, Polar is an address nobody
    answers on."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "polar_access_token": SIM_TOKEN,
        "polar_api_url": sim.base_url if sim is not None else "http://127.0.0.1:9",
        "polar_webhook_secret": WEBHOOK_SECRET,
        "polar_timeout_seconds": 3.0,
        # Tests that are about the budget set their own; the rest must not wait on it.
        "polar_requests_per_minute": 1_000_000,
        "log_format": "json",
    }
    values.update(extra)
    return Settings(**values)


def secret_of(settings: Settings) -> str:
    """The receiver's endpoint secret, which the simulated Polar signs with."""
    return settings.require_webhook_secret().get_secret_value()
