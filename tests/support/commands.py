"""The `seat-sync` command as people and scripts run it: a real subprocess whose environment
is the test's, never the developer's own POLAR_/DATABASE_/REDIS_ variables."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.settings import SIM_TOKEN
from worker.simulator.server import SimulatedPolar

SEAT_SYNC = str(Path(sys.executable).with_name("seat-sync"))
# The variables that say which Polar, database and Redis a process uses.
OWN_PREFIXES = ("POLAR_", "DATABASE_", "REDIS_")


def environment(values: Mapping[str, str] | None = None, /, **more: str) -> dict[str, str]:
    """This process's environment without POLAR_/DATABASE_/REDIS_ variables, then `values`
    and `more`: a child process sees only the settings the test gives it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_PREFIXES)}
    env.update(values or {})
    env.update(more)
    return env


def forget_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset this process's POLAR_/DATABASE_/REDIS_ variables for one test, so that
    settings read from the environment see only what the test sets."""
    for name in list(os.environ):
        if name.startswith(OWN_PREFIXES):
            monkeypatch.delenv(name)


@dataclass
class Ran:
    """How one `seat-sync` command ended: exit code, standard output, standard error."""

    code: int
    out: str
    err: str


async def seat_sync(*args: str, env: Mapping[str, str], cwd: Path | None = None) -> Ran:
    """Run `seat-sync ARGS` to completion (60 s at most) with `env` in place of the caller's
    settings, on a terminal 200 columns wide."""
    proc = await asyncio.create_subprocess_exec(
        SEAT_SYNC,
        *args,
        env=environment(env, COLUMNS="200"),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def env_for(database_url: str, sim: SimulatedPolar, redis_url: str, **extra: str) -> dict[str, str]:
    """The settings of a command against this database, this simulated Polar and Redis."""
    return {
        "DATABASE_URL": database_url,
        "POLAR_API_URL": sim.base_url,
        "POLAR_ACCESS_TOKEN": SIM_TOKEN,
        "REDIS_URL": redis_url,
        "LOG_FORMAT": "json",
        **extra,
    }
