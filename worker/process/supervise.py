"""Keeping long-lived parts running in one process: stop them all together on SIGTERM/SIGINT
or when one stops, and rebuild the arq worker when Redis comes back."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

log = structlog.get_logger("worker.process.supervise")

Part = Callable[[], Coroutine[Any, Any, None]]


async def run_until_signalled(parts: Sequence[Part]) -> None:
    """Run long-lived parts together until SIGTERM/SIGINT or until one of them stops;
    then stop the others. A part that failed re-raises its error."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = [asyncio.create_task(part()) for part in parts]
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*running, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for task in [*running, waiter]:
            task.cancel()
        results = await asyncio.gather(*running, return_exceptions=True)
    if stop.is_set():
        log.info("shutdown_requested")
    for result in results:
        if isinstance(result, Exception):
            raise result


async def keep_worker_running(make: Callable[[], Any], *, max_delay: float = 30.0) -> None:
    """arq's worker stops when Redis goes away: build a new one once Redis is back, rather
    than leaving the process to a supervisor's restart backoff."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    delay = 1.0
    loop = asyncio.get_running_loop()
    while True:
        worker = make()
        started = loop.time()
        try:
            await worker.async_run()
            return
        except (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError) as exc:
            if loop.time() - started > 60:
                delay = 1.0
            log.warning("worker_redis_lost", error=type(exc).__name__, retry_in=delay)
        finally:
            with contextlib.suppress(Exception):
                await worker.close()
        await asyncio.sleep(delay)
        delay = min(max_delay, delay * 2)
