"""Signed webhook delivery from the simulated Polar, signed and retried exactly as Polar does.

Polar signs with the UTF-8 bytes of the WHOLE `whsec_…` secret (not base64-decoded), over
`"{webhook-id}.{webhook-timestamp}.{body}"`. A redelivery re-sends the same body bytes
with the same `webhook-id` and a fresh `webhook-timestamp`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import random
import secrets
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from worker.simulator.state import Event, SimState, iso

DELIVERY_TIMEOUT = 10.0
SIGNATURE_TOLERANCE = 300


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Polar's `webhook-signature` value: `v1,<base64 HMAC-SHA256>`."""
    message = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str,
    msg_id: str,
    timestamp: str | int,
    body: bytes,
    signature_header: str,
    *,
    now: float | None = None,
    tolerance: int = SIGNATURE_TOLERANCE,
) -> bool:
    """Check a header that may carry several space-separated `v1,<sig>` values."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(
        hmac.compare_digest(candidate, expected) for candidate in signature_header.split(" ")
    )


def envelope_bytes(event: Event) -> bytes:
    """The compact JSON body Polar posts: `{"type", "timestamp", "data"}`."""
    envelope = {"type": event.type, "timestamp": iso(event.timestamp), "data": event.data}
    return json.dumps(envelope, separators=(",", ":")).encode()


@dataclass
class Delivery:
    """One event for the endpoint: its stable id and the exact bytes every attempt sends."""

    webhook_id: str
    type: str
    body: bytes
    attempts: int = 0
    delivered: bool = False
    failed: bool = False


@dataclass(frozen=True)
class DeliveryAttempt:
    webhook_id: str
    type: str
    attempt: int
    timestamp: int
    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass
class DeliveryChaos:
    """Knobs for chaos tests; all draws come from one seeded RNG."""

    drop_probability: float = 0.0
    duplicate_probability: float = 0.0
    delay_range: tuple[float, float] = (0.0, 0.0)
    reorder: bool = False


@dataclass
class _Backoff:
    base: float
    factor: float
    maximum: float

    def delay(self, attempt: int) -> float:
        return float(min(self.maximum, self.base * self.factor ** (attempt - 1)))


@dataclass
class _Tasks:
    running: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task


class WebhookSender:
    """Drains `SimState.outbox` and POSTs signed envelopes to one endpoint.

    Delivery starts in the background after each mutation once `start()` ran and a URL is
    configured; `await flush()` waits until the outbox is empty and nothing is in flight.
    First attempts go out in event order; a failed event is retried in the background
    with exponential backoff, so (like Polar) it can arrive after newer ones.
    """

    def __init__(
        self,
        state: SimState,
        *,
        url: str | None = None,
        secret: str | None = None,
        timeout: float = DELIVERY_TIMEOUT,
        max_attempts: int = 10,
        backoff_base: float = 0.05,
        backoff_factor: float = 2.0,
        backoff_max: float = 2.0,
        disable_after: int = 10,
        seed: int = 0,
        chaos: DeliveryChaos | None = None,
        timestamp_clock: Callable[[], float] = time.time,
        auto: bool = True,
    ) -> None:
        self.state = state
        self.url = url
        self.secret = secret or ("whsec_" + secrets.token_urlsafe(32))
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = _Backoff(backoff_base, backoff_factor, backoff_max)
        self.disable_after = disable_after
        self.rng = random.Random(seed)
        self.chaos = chaos or DeliveryChaos()
        self.timestamp_clock = timestamp_clock
        self.auto = auto
        self.disabled = False
        self.deliveries: dict[str, Delivery] = {}
        self.attempts: list[DeliveryAttempt] = []
        self.dropped: list[str] = []
        self.discarded: list[str] = []
        self._consecutive_failures = 0
        self._client: httpx.AsyncClient | None = None
        self._tasks = _Tasks()
        self._drain_task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        state.listeners.append(self._on_event)

    # ------------------------------------------------------------------ lifecycle

    def configure(self, *, url: str | None = None, secret: str | None = None) -> None:
        if url is not None:
            self.url = url
        if secret is not None:
            self.secret = secret

    def enable(self) -> None:
        """Re-enable an endpoint Polar disabled; nothing missed is backfilled."""
        self.disabled = False
        self._consecutive_failures = 0

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        self._closing = asyncio.Event()

    async def aclose(self) -> None:
        self._closing.set()
        tasks = list(self._tasks.running)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._drain_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ draining

    def _on_event(self) -> None:
        if not self.auto or self.url is None or self._client is None or self._closing.is_set():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # mutated outside the loop (test setup): flush() will pick it up
        self._kick()

    def kick(self) -> None:
        """Start delivering whatever is queued (no-op without a URL or before `start()`)."""
        if self.url is not None and self._client is not None and not self._closing.is_set():
            self._kick()

    def _kick(self) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = self._tasks.spawn(self._drain())

    async def _drain(self) -> None:
        # Yield once so a burst of events from one mutation lands in one batch.
        await asyncio.sleep(0)
        while self.state.outbox and self.url is not None:
            batch = [self._prepare(event) for event in self.state.drain_outbox()]
            if self.chaos.reorder:
                self.rng.shuffle(batch)
            for delivery in batch:
                if delivery is None:
                    continue
                if self.rng.random() < self.chaos.drop_probability:
                    self.dropped.append(delivery.webhook_id)
                    continue
                copies = 2 if self.rng.random() < self.chaos.duplicate_probability else 1
                low, high = self.chaos.delay_range
                for _ in range(copies):
                    if high > 0:
                        delay = self.rng.uniform(low, high)
                        self._tasks.spawn(self._deliver(delivery, delay))
                    else:
                        await self._deliver(delivery, 0.0, first_inline=True)

    def _prepare(self, event: Event) -> Delivery | None:
        webhook_id = str(uuid.uuid4())
        if self.disabled:
            # A disabled endpoint gets no events at all, and none are backfilled later.
            self.discarded.append(webhook_id)
            return None
        delivery = Delivery(webhook_id=webhook_id, type=event.type, body=envelope_bytes(event))
        self.deliveries[webhook_id] = delivery
        return delivery

    async def _deliver(
        self, delivery: Delivery, delay: float, *, first_inline: bool = False
    ) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        if await self._attempt(delivery):
            return
        if first_inline:
            self._tasks.spawn(self._retry(delivery))
        else:
            await self._retry(delivery)

    async def _retry(self, delivery: Delivery) -> None:
        while not delivery.delivered and delivery.attempts < self.max_attempts:
            await asyncio.sleep(self.backoff.delay(delivery.attempts))
            if await self._attempt(delivery):
                return
        if not delivery.delivered and not delivery.failed:
            delivery.failed = True
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.disable_after:
                self.disabled = True

    async def _attempt(self, delivery: Delivery) -> bool:
        assert self._client is not None
        assert self.url is not None
        delivery.attempts += 1
        timestamp = int(self.timestamp_clock())
        headers = {
            "webhook-id": delivery.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, delivery.webhook_id, timestamp, delivery.body),
            "content-type": "application/json",
        }
        status: int | None = None
        error: str | None = None
        try:
            response = await self._client.post(self.url, content=delivery.body, headers=headers)
            status = response.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempt = DeliveryAttempt(
            delivery.webhook_id, delivery.type, delivery.attempts, timestamp, status, error
        )
        self.attempts.append(attempt)
        if attempt.ok:
            delivery.delivered = True
            self._consecutive_failures = 0
        return attempt.ok

    # ------------------------------------------------------------------ public helpers

    async def flush(self, max_wait: float = 30.0) -> None:
        """Deliver everything queued and wait for in-flight deliveries and retries."""
        if self.url is None:
            return
        if self._client is None:
            await self.start()
        async with asyncio.timeout(max_wait):
            while self.state.outbox or self._tasks.running:
                if self.state.outbox:
                    self._kick()
                await asyncio.gather(*list(self._tasks.running), return_exceptions=True)

    async def redeliver(self, webhook_id: str) -> DeliveryAttempt:
        """Send one event again: same id, same bytes, fresh timestamp and signature."""
        if self._client is None:
            await self.start()
        await self._attempt(self.deliveries[webhook_id])
        return self.attempts[-1]

    def attempts_for(self, webhook_id: str) -> list[DeliveryAttempt]:
        return [a for a in self.attempts if a.webhook_id == webhook_id]

    def delivered_types(self) -> list[str]:
        return [a.type for a in self.attempts if a.ok]
