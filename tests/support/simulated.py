"""The simulated Polar as tests start it: over loopback, accepting the tests' token."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.settings import SIM_TOKEN
from worker.simulator.server import SimulatedPolar


@contextlib.asynccontextmanager
async def polar_from_the_past(
    *, seed: int, hours: float = 30, **options: Any
) -> AsyncIterator[SimulatedPolar]:
    """A simulated Polar whose clock starts `hours` ago (and stands still until a test
    advances it), so that invitations made on it can be made to expire."""
    start = datetime.now(UTC) - timedelta(hours=hours)
    async with SimulatedPolar(token=SIM_TOKEN, seed=seed, clock=lambda: start, **options) as polar:
        yield polar
