"""Run the simulated Polar: in-process for tests (`SimulatedPolar`) or blocking for the CLI.

The in-process server is uvicorn on a loopback socket we bind ourselves (so the port is
known before serving and is freed on stop), inside the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import httpx
import uvicorn

from worker.simulator.app import (
    DEFAULT_TOKEN,
    ApiRuntime,
    FaultKind,
    FaultRule,
    ListHold,
    RequestLog,
    build_app,
)
from worker.simulator.control import control_routes
from worker.simulator.state import SimState
from worker.simulator.versions import DEFAULT_API_VERSION
from worker.simulator.webhooks import DeliveryChaos, SecretKind, WebhookSender

log = logging.getLogger(__name__)


class SimulatedPolar:
    """A simulated Polar organization served over HTTP on a loopback port.

    `webhook_secret_kind` is the endpoint's secret generation: `standard` (Polar's default
    today: signed with the base64-decoded key) or `legacy` (an older endpoint: signed with
    the whole string); without `webhook_secret` one of that kind is generated.
    `member_model=False` simulates an organisation without the member model (seats carry
    no member and no `email`; the address is the holder customer's `customer_email`).
    `api_version` is the webhook endpoint's version (the envelopes' shapes and
    `api_version`) and what a request without `Polar-Version` is served.
    `subscription_orders` makes subscriptions create their orders as Polar does.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        rate_limit: int = 500,
        rate_window: float = 60.0,
        latency: float = 0.0,
        seed: int = 0,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_secret_kind: SecretKind = "standard",  # noqa: S107 - a kind, not a secret
        member_model: bool = True,
        api_version: str = DEFAULT_API_VERSION,
        subscription_orders: bool = False,
        clock: Callable[[], datetime] | None = None,
        webhook_backoff: float = 0.05,
        webhook_chaos: DeliveryChaos | None = None,
    ) -> None:
        self.token = token
        self.api_version = api_version
        self.state = SimState(
            clock=clock,
            seed=seed,
            member_model_enabled=member_model,
            subscription_orders=subscription_orders,
        )
        self.runtime = ApiRuntime(
            token=token,
            rate_limit=rate_limit,
            rate_window=rate_window,
            latency=latency,
            seed=seed,
            api_version=api_version,
        )
        self.webhooks = WebhookSender(
            self.state,
            url=webhook_url,
            secret=webhook_secret,
            secret_kind=webhook_secret_kind,
            api_version=api_version,
            seed=seed,
            backoff_base=webhook_backoff,
            chaos=webhook_chaos,
        )
        self.app = build_app(
            self.state, self.runtime, control_routes(self.state, self.runtime, self.webhooks)
        )
        self.base_url = ""
        self._server: uvicorn.Server | None = None
        self._serve_task: asyncio.Task[None] | None = None

    @property
    def log(self) -> RequestLog:
        return self.runtime.log

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on `host:port` (0 = a free port) and return the base URL."""
        if self._serve_task is not None:
            raise RuntimeError("simulator already started")
        self.runtime.closing = asyncio.Event()
        await self.webhooks.start()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        # `_serve` rather than `serve`: leave the host process's signal handlers alone.
        self._serve_task = asyncio.create_task(server._serve(sockets=[sock]))
        self._server = server
        while not server.started:
            if self._serve_task.done():
                await self._serve_task  # re-raises the startup error
                raise RuntimeError("simulator failed to start")
            await asyncio.sleep(0.005)
        shown_host = f"[{host}]" if family == socket.AF_INET6 else host
        self.base_url = f"http://{shown_host}:{bound_port}"
        log.info("simulated polar listening on %s token=%s", self.base_url, self.token)
        self.webhooks.kick()  # events created before start
        return self.base_url

    async def stop(self) -> None:
        """Stop serving: end holds and hangs, stop deliveries, free the port."""
        self.runtime.closing.set()
        await self.webhooks.aclose()
        if self._server is not None and self._serve_task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_task
        self._server = None
        self._serve_task = None

    async def __aenter__(self) -> SimulatedPolar:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ knobs

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client for the API with the token and `Polar-Version` set."""
        headers = {
            "Authorization": f"Bearer {token or self.token}",
            "Polar-Version": self.api_version,
        }
        headers.update(kwargs.pop("headers", {}))
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, **kwargs)

    def add_token(self, token: str, scopes: set[str] | frozenset[str] | None = None) -> None:
        self.runtime.add_token(token, scopes)

    def add_fault(
        self,
        path_contains: str,
        kind: FaultKind = "status",
        *,
        status: int = 500,
        body: str | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        times: int | None = 1,
        probability: float = 1.0,
        method: str | None = None,
        hang_seconds: float = 30.0,
    ) -> FaultRule:
        return self.runtime.add_fault(
            path_contains,
            kind,
            status=status,
            body=body,
            headers=headers,
            times=times,
            probability=probability,
            method=method,
            hang_seconds=hang_seconds,
        )

    def clear_faults(self) -> None:
        self.runtime.clear_faults()

    def set_latency(self, seconds: float, path_contains: str | None = None) -> None:
        self.runtime.set_latency(seconds, path_contains)

    def set_rate_limit(self, rate_limit: int, rate_window: float | None = None) -> None:
        self.runtime.limiter.configure(rate_limit, rate_window)

    def hold_list_seats(
        self,
        seconds: float,
        snapshot: Literal["before", "after"] = "before",
        *,
        times: int | None = None,
        container_id: str | None = None,
    ) -> ListHold:
        return self.runtime.hold_list_seats(
            seconds, snapshot, times=times, container_id=container_id
        )

    def release_hold(self) -> None:
        self.runtime.release_hold()


def _seed(sim: SimulatedPolar, subscriptions: int, orders: int) -> None:
    for index in range(subscriptions):
        sub = sim.state.create_subscription(seats=3 + index % 3)
        for member in range(1 + index % 3):
            sim.state.assign(subscription_id=sub["id"], email=f"user{index}-{member}@example.com")
    for index in range(orders):
        order = sim.state.create_order(seats=2 + index % 2)
        sim.state.assign(order_id=order["id"], email=f"buyer{index}@example.com")


def run_simulator(
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    token: str = DEFAULT_TOKEN,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    webhook_secret_kind: SecretKind = "standard",  # noqa: S107 - a kind, not a secret
    member_model: bool = True,
    api_version: str = DEFAULT_API_VERSION,
    rate_limit: int = 500,
    rate_window: float = 60.0,
    latency: float = 0.0,
    seed: int = 0,
    seed_subscriptions: int = 0,
    seed_orders: int = 0,
) -> None:
    """Serve the simulator until SIGINT/SIGTERM (the `seat-sync simulator` command)."""

    async def main() -> None:
        try:
            sim = SimulatedPolar(
                token=token,
                rate_limit=rate_limit,
                rate_window=rate_window,
                latency=latency,
                seed=seed,
                webhook_url=webhook_url,
                webhook_secret=webhook_secret,
                webhook_secret_kind=webhook_secret_kind,
                member_model=member_model,
                api_version=api_version,
                webhook_backoff=2.0,
            )
        except ValueError as exc:  # e.g. an older endpoint's secret without the legacy kind
            raise SystemExit(f"error: {exc} (--legacy-webhook-secret)") from None
        _seed(sim, seed_subscriptions, seed_orders)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await sim.start(host, port)
        print(
            f"Simulated Polar API: {sim.base_url}  (Polar-Version: {sim.api_version}; "
            f"member model {'on' if member_model else 'off'})",
            flush=True,
        )
        # The demo token is public; a token or secret the caller chose is never echoed.
        shown = sim.token if sim.token == DEFAULT_TOKEN else "(the one given with --token)"
        print(f"Organization access token: {shown}", flush=True)
        if webhook_url:
            kind = sim.webhooks.secret_kind
            # A secret the simulator generated is its own, like the demo token: shown so
            # a receiver can be pointed at it. One the caller gave is not.
            secret = sim.webhooks.secret if webhook_secret is None else "the given secret"
            print(f"Webhooks -> {webhook_url}  signed with {secret} ({kind} key)", flush=True)
        try:
            await stop.wait()
        finally:
            await sim.stop()

    asyncio.run(main())
