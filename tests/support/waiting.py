"""Waiting for a condition that other tasks or processes bring about."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable

import httpx


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    within: float,
    what: str | Callable[[], str],
    every: float = 0.1,
) -> None:
    """Poll `check` (plain or async) every `every` seconds until it holds; fail the test
    naming `what` if it does not within `within` seconds (a callable `what` is asked then,
    e.g. for the log of a process that never came up)."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"not reached within {within:g} s: {said}")
        await asyncio.sleep(every)


async def until_answering(
    url: str, *, within: float, what: str | Callable[[], str], every: float = 0.05
) -> None:
    """Wait until `GET url` answers 200: a server another task or process is starting.
    Refused and cut connections count as "not yet"."""
    async with httpx.AsyncClient(timeout=2) as client:

        async def answers() -> bool:
            with contextlib.suppress(httpx.TransportError):
                return (await client.get(url)).status_code == 200
            return False

        await eventually(answers, within=within, what=what, every=every)
