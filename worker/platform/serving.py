"""Serving HTTP: an ASGI app under uvicorn, in the foreground or inside the running event loop,
and the worker's small Prometheus endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import structlog
import uvicorn
from starlette.types import ASGIApp

log = structlog.get_logger("worker.platform.serving")


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the caller owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(app: ASGIApp, *, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=15,
    )


async def serve(
    app: ASGIApp, *, host: str, port: int, handle_signals: bool = True, what: str = "server"
) -> None:
    """Run `app` under uvicorn until SIGINT/SIGTERM (when `handle_signals`) or until the
    calling task is cancelled; either way it shuts down gracefully."""
    config = uvicorn_config(app, host=host, port=port)
    server = uvicorn.Server(config) if handle_signals else _QuietServer(config)
    task = asyncio.ensure_future(server.serve())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
    if not server.started:
        raise RuntimeError(f"{what} failed to start on {host}:{port}")


@contextlib.asynccontextmanager
async def running(
    app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, what: str = "server"
) -> AsyncIterator[str]:
    """Serve `app` inside the current event loop (tests, demo, benchmark) on a socket bound
    here, so the port is known before serving; yields the base URL (`http://host:port`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket says TCP, and without it each response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    bound_port = sock.getsockname()[1]
    config = uvicorn_config(app, host=host, port=bound_port)
    config.timeout_graceful_shutdown = 1
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError(f"{what} failed to start")
            await asyncio.sleep(0.005)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        yield f"http://{shown}:{bound_port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


async def serve_metrics(
    port: int, refresh: Callable[[], Awaitable[None]], *, every: float = 10.0
) -> None:
    """Prometheus's text format on `port` (a thread of prometheus_client), with `refresh`
    awaited every `every` seconds to update the gauges read from state; until cancelled."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port)
    log.info("metrics_listening", port=port)
    try:
        while True:
            started = time.monotonic()
            await refresh()
            await asyncio.sleep(max(1.0, every - (time.monotonic() - started)))
    finally:
        server.shutdown()
        thread.join(timeout=5)
