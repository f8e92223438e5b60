"""Signed webhook delivery from the simulated Polar, signed and retried exactly as Polar does.

The signature is HMAC-SHA256 over `"{webhook-id}.{webhook-timestamp}.{body}"`, base64, sent
as `v1,<sig>`. Polar picks the key per endpoint from when its secret was generated:

- `standard` (every endpoint created since 2026-09-08): the secret is `whsec_` + base64 of
  32 random bytes, and the key is that base64 DECODED (the Standard Webhooks scheme);
- `legacy` (older endpoints): the key is the UTF-8 bytes of the WHOLE `whsec_…` string.

A redelivery re-sends the same body bytes with the same `webhook-id` and a fresh
`webhook-timestamp` (so a fresh signature).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
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
from typing import Any, Literal

import httpx

from worker.simulator.state import Event, SimState, iso
from worker.simulator.versions import DEFAULT_API_VERSION, check_api_version, render

DELIVERY_TIMEOUT = 10.0
SECRET_PREFIX = "whsec_"

SecretKind = Literal["standard", "legacy"]
SECRET_KINDS: tuple[SecretKind, ...] = ("standard", "legacy")


def new_webhook_secret(kind: SecretKind = "standard") -> str:
    """A fresh endpoint secret of the given generation, shaped as Polar issues it."""
    if kind == "standard":
        return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
    if kind == "legacy":
        return SECRET_PREFIX + secrets.token_urlsafe(32)
    raise ValueError(f"webhook secret kind must be one of {', '.join(SECRET_KINDS)}")


def signing_key(secret: str, kind: SecretKind) -> bytes:
    """The HMAC key Polar uses for an endpoint whose secret is of generation `kind`.

    The error never repeats the secret.
    """
    if kind == "legacy":
        return secret.encode()
    if kind != "standard":
        raise ValueError(f"webhook secret kind must be one of {', '.join(SECRET_KINDS)}")
    remainder = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(remainder + "=" * (-len(remainder) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not secret.startswith(SECRET_PREFIX) or not key:
        raise ValueError(
            "a standard webhook secret is 'whsec_' followed by base64; "
            "an older endpoint's secret needs the legacy kind"
        )
    return key


def sign(secret: str, kind: SecretKind, msg_id: str, timestamp: int, body: bytes) -> str:
    """Polar's `webhook-signature` value for one attempt: `v1,<base64 HMAC-SHA256>`."""
    message = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret, kind), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def envelope_bytes(event: Event, api_version: str = DEFAULT_API_VERSION) -> bytes:
    """The compact JSON body Polar posts: `{"type", "timestamp", "data", "api_version"}`.

    `data` has the shapes of the endpoint's API version, which the envelope names.
    """
    envelope = {
        "type": event.type,
        "timestamp": iso(event.timestamp),
        "data": render(event.data, api_version),
        "api_version": api_version,
    }
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
        secret_kind: SecretKind = "standard",  # noqa: S107 - a kind, not a secret
        api_version: str = DEFAULT_API_VERSION,
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
        self.secret_kind: SecretKind = secret_kind
        self.secret = secret or new_webhook_secret(secret_kind)
        signing_key(self.secret, self.secret_kind)  # refuse a secret this kind cannot sign with
        self.api_version = check_api_version(api_version)
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

    def configure(
        self,
        *,
        url: str | None = None,
        secret: str | None = None,
        kind: SecretKind | None = None,
    ) -> None:
        """Point the endpoint elsewhere or give it a secret (of `kind`, else the current one)."""
        new_kind = kind or self.secret_kind
        if secret is not None or kind is not None:
            signing_key(secret or self.secret, new_kind)
        if url is not None:
            self.url = url
        if secret is not None:
            self.secret = secret
        self.secret_kind = new_kind

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
        delivery = Delivery(
            webhook_id=webhook_id, type=event.type, body=envelope_bytes(event, self.api_version)
        )
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
            "webhook-signature": sign(
                self.secret, self.secret_kind, delivery.webhook_id, timestamp, delivery.body
            ),
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
