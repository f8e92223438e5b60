"""The settings a command runs with: read from the environment, logging configured from them.

A bad value raises ConfigError naming the variable; the app prints it as one line (exit 2).
The read commands use the lighter `worker.query.environment.read_settings` instead.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from worker.config import Settings

T = TypeVar("T")


def settings_from_env() -> Settings:
    """Every setting, validated (pydantic-settings is loaded here, not at import)."""
    from worker.config import load_settings
    from worker.platform import logs

    settings = load_settings()
    logs.configure(log_format=settings.log_format, level=settings.log_level)
    return settings


def run_async(work: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(work)`, with asyncio loaded only by the commands that need it."""
    import asyncio

    return asyncio.run(work)
