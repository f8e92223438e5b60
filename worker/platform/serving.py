"""Serving HTTP: an ASGI app under uvicorn, in the foreground or inside the running event loop,
and the Prometheus endpoint every long-running process serves on a port of its own."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from worker.platform import metrics

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
        http="httptools",  # a dependency: parses requests in C (h11 is pure Python)
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
    calling task is cancelled; either way it shuts down gracefully. A port in use is an
    OSError naming `what` and the address, before the app starts."""
    try:
        sock = _bind(host, port)
    except OSError as exc:
        raise OSError(
            exc.errno, f"{what} cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    config = uvicorn_config(app, host=host, port=port)
    server = uvicorn.Server(config) if handle_signals else _QuietServer(config)
    task = asyncio.ensure_future(_serve_on(server, sock))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise
    finally:
        sock.close()
    if not server.started:
        raise RuntimeError(f"{what} failed to start on {host}:{port} (see the log above)")


async def _serve_on(server: uvicorn.Server, sock: socket.socket) -> None:
    # uvicorn exits the process when the app's startup fails (it logged why); the caller
    # sees `server.started` false and raises instead.
    with contextlib.suppress(SystemExit):
        await server.serve(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket says TCP, and without it each response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def running(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    what: str = "server",
    lifespan: bool = True,
) -> AsyncIterator[str]:
    """Serve `app` inside the current event loop on a socket bound here, so that the port
    is known, and a port in use fails, before serving; yields the base URL
    (`http://host:port`). Used by tests, the demo, the benchmarks and the metrics server.
    `lifespan=False`: the app has no startup or shutdown of its own to run."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    config = uvicorn_config(app, host=host, port=bound_port)
    config.timeout_graceful_shutdown = 1
    config.lifespan = "on" if lifespan else "off"
    server = _QuietServer(config)
    task = asyncio.create_task(_serve_on(server, sock))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError(f"{what} failed to start")
            await asyncio.sleep(0.005)
        shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
        yield f"http://{shown}:{bound_port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


# ---------------------------------------------------------------------- metrics

# A scrape waits this long for a refresh in flight, then answers with the previous values
# (Prometheus's default scrape timeout is 10 s); the refresh goes on for the next scrape.
SCRAPE_WAIT_SECONDS = 5.0


class ThrottledRefresh:
    """Runs `refresh` at most once per `every` seconds, however often it is awaited.

    The interval runs from the end of one refresh to the start of the next, so a slow
    refresh cannot run back to back either. Callers that arrive while a refresh runs share
    it; those that arrive within the interval after it return at once (the gauges keep the
    values it set). A failed refresh counts as one: a database that is down is not asked
    again on every scrape.
    """

    def __init__(
        self,
        refresh: Callable[[], Awaitable[None]],
        *,
        every: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refresh = refresh
        self.every = every
        self._clock = clock
        self._finished_at: float | None = None
        self._in_flight: asyncio.Task[None] | None = None
        self.rounds = 0
        """Refreshes started so far."""

    async def __call__(self, *, wait: float | None = None) -> None:
        """Refresh if due, sharing one in flight; return after it, or after `wait`
        seconds (the refresh then finishes on its own)."""
        if self._in_flight is None:
            if self._finished_at is not None and self._clock() - self._finished_at < self.every:
                return
            self.rounds += 1
            self._in_flight = asyncio.create_task(self._run())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await asyncio.shield(self._in_flight)

    async def _run(self) -> None:
        try:
            await self._refresh()
        except Exception as exc:  # a scrape answers with the previous values
            log.warning("metrics_refresh_failed", error=type(exc).__name__)
        finally:
            self._finished_at = self._clock()
            self._in_flight = None

    async def aclose(self) -> None:
        task, self._in_flight = self._in_flight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def metrics_app(refresh: ThrottledRefresh) -> Starlette:
    """`GET /metrics` in Prometheus's text format, after `refresh` (throttled); nothing
    else (404)."""

    async def scrape(_request: Request) -> Response:
        await refresh(wait=SCRAPE_WAIT_SECONDS)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return Starlette(routes=[Route("/metrics", scrape, methods=["GET"])])


@contextlib.asynccontextmanager
async def metrics_running(
    port: int,
    refresh: Callable[[], Awaitable[None]],
    *,
    every: float,
    host: str = "127.0.0.1",
) -> AsyncIterator[str]:
    """The Prometheus endpoint on `host:port`, inside the current event loop, with
    `refresh` (the gauges read from state) run at most once per `every` seconds however
    often it is scraped; yields the URL of `/metrics`. A port in use fails here."""
    throttled = ThrottledRefresh(refresh, every=every)
    # No lifespan: a process that ends without stopping this server (arq skips its
    # on_shutdown when a job is cancelled at close) leaves no startup-shutdown task behind.
    app = metrics_app(throttled)
    try:
        async with running(app, host=host, port=port, what="metrics", lifespan=False) as url:
            log.info("metrics_listening", host=host, port=port)
            yield url + "/metrics"
    finally:
        await throttled.aclose()


async def serve_metrics(
    port: int,
    refresh: Callable[[], Awaitable[None]],
    *,
    every: float = 15.0,
    host: str = "127.0.0.1",
) -> None:
    """`metrics_running` until cancelled (the worker's metrics task)."""
    async with metrics_running(port, refresh, every=every, host=host):
        await asyncio.Event().wait()
