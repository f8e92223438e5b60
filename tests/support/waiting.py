"""Waiting for a condition that other tasks or processes bring about."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    within: float,
    what: str,
    every: float = 0.1,
) -> None:
    """Poll `check` (plain or async) every `every` seconds until it holds; fail the test
    naming `what` if it does not within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within:g} s: {what}")
        await asyncio.sleep(every)
