"""The webhook receiver (Starlette ASGI): verify -> record in the inbox -> request syncs -> 202.

It answers fast and almost never fails, because Polar disables an endpoint after ten
failed events: no Polar calls here, a capped body read, one short transaction. The
delivery and its scopes are committed before we answer; handing the syncs to Redis is
best effort, and the worker's `sweep_inbox` picks up whatever did not make it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from worker import queue
from worker.config import ConfigError, Settings
from worker.intake.inbox import Recorded, record_delivery
from worker.intake.signature import (
    TOLERANCE_SECONDS,
    SignatureRejectedError,
    signing_keys,
    verify_signature,
)
from worker.models import utcnow
from worker.platform import metrics, serving
from worker.platform.db import create_engine, retry_transaction, session_factory
from worker.platform.redis import lazy_redis
from worker.polar.budget import RedisBudget
from worker.query import gauges

log = structlog.get_logger("worker.intake.receiver")

WEBHOOK_PATH = "/webhooks/polar"
MAX_BODY_BYTES = 1024 * 1024
MAX_WEBHOOK_ID_LENGTH = 255
# Polar gives up after 10 s and wants an answer within 2 s.
DATABASE_TIMEOUT_SECONDS = 8.0
# PostgreSQL connections of one web process (no overflow: see the lifespan).
RECEIVER_POOL_SIZE = 10
ENQUEUE_TIMEOUT_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 2.0


# ---------------------------------------------------------------------- request parsing


class RejectedError(Exception):
    """The receiver will not take this request. Every refusal is one of these, turned into
    the HTTP answer, the log line and the counted outcome in one place (`_refusal`)."""

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        outcome: str,
        error: str | None = None,
        event: str = "webhook_rejected",
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        """Why, for the log: a constant snake_case word."""
        self.detail = detail
        """What the sender is told."""
        self.outcome = outcome
        """The webhook counter's `outcome` label."""
        self.error = error
        """What went wrong underneath, when something did (safe to log)."""
        self.event = event
        """The log event."""


def _too_large(limit: int) -> RejectedError:
    return RejectedError(
        413, "body_too_large", f"body larger than {limit} bytes", outcome="too_large"
    )


def check_declared_length(request: Request, limit: int = MAX_BODY_BYTES) -> None:
    """Refuse a Content-Length over `limit` before a byte of the body is read."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise RejectedError(
            400, "bad_content_length", "invalid content-length", outcome="bad_request"
        ) from None
    if length > limit:
        raise _too_large(limit)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refusing more than `limit` bytes whatever Content-Length claims."""
    check_declared_length(request, limit)
    too_large = _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def signed_headers(request: Request) -> tuple[str, str, str]:
    """(webhook-id, webhook-timestamp, webhook-signature), all present and of sane size."""
    webhook_id = request.headers.get("webhook-id", "").strip()
    timestamp = request.headers.get("webhook-timestamp", "").strip()
    signature = request.headers.get("webhook-signature", "").strip()
    if not (webhook_id and timestamp and signature):
        raise RejectedError(
            400,
            "missing_headers",
            "webhook-id, webhook-timestamp and webhook-signature required",
            outcome="bad_request",
        )
    if len(webhook_id) > MAX_WEBHOOK_ID_LENGTH:
        raise RejectedError(
            400, "webhook_id_too_long", "webhook-id too long", outcome="bad_request"
        )
    return webhook_id, timestamp, signature


def check_timestamp(timestamp: str, *, now: float | None = None) -> None:
    """Refuse a `webhook-timestamp` outside the replay window before the body is read, with
    the reasons `verify_signature` gives (which checks it again, with the body)."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        reason = "invalid_timestamp"
    else:
        current = time.time() if now is None else now
        if abs(current - sent_at) <= TOLERANCE_SECONDS:
            return
        reason = "stale_timestamp" if sent_at < current else "future_timestamp"
    raise RejectedError(403, reason, "signature verification failed", outcome="bad_signature")


def parse_envelope(body: bytes) -> tuple[str, dict[str, Any]]:
    """The raw text and the envelope object; RejectedError unless it is an object with a type."""

    def bad(message: str) -> RejectedError:
        return RejectedError(400, "bad_payload", message, outcome="bad_payload", error=message)

    try:
        raw = body.decode("utf-8")
        envelope = json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested beyond reason
        raise bad("body is not JSON") from None
    if not isinstance(envelope, dict):
        raise bad("body is not a JSON object")
    event_type = envelope.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise bad("body has no event type")
    if _has_nul(envelope):
        # PostgreSQL text cannot hold NUL: refuse it (400) rather than fail the commit
        # (503) on every one of Polar's retries until it disables the endpoint.
        raise bad("body contains NUL characters")
    return raw, envelope


def _has_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# ---------------------------------------------------------------------- the app


def _counted(response: JSONResponse, event_type: str | None, outcome: str) -> JSONResponse:
    # Only verified payloads name their type: an attacker cannot inflate label cardinality.
    metrics.WEBHOOKS.labels(type=event_type or "unverified", outcome=outcome).inc()
    return response


def _problem(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


class _Sampler:
    """Lets one log line through per `every` seconds and counts the ones it holds back:
    anyone can send the receiver bad requests, as fast as they like, and a warning per
    request would make a flood cost disk and CPU (the counter still counts each one)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._next_at = 0.0
        self._held = 0

    def take(self) -> int | None:
        """The number held back since the last line let through, or None to hold."""
        now = time.monotonic()
        if now < self._next_at:
            self._held += 1
            return None
        held, self._held, self._next_at = self._held, 0, now + self.every
        return held


# Refusals of requests not proven to come from Polar (refused before or by the signature
# check): at most one warning per 10 s. A signed payload refused later is always logged.
_UNVERIFIED_OUTCOMES = frozenset({"bad_request", "too_large", "bad_signature"})
_UNVERIFIED_LOGGED = _Sampler(10.0)


def _refusal(
    rejected: RejectedError, *, webhook_id: str | None, event_type: str | None
) -> JSONResponse:
    """The one translation of a refusal: a log line, a counted outcome, the HTTP answer."""
    context = {"webhook_id": webhook_id, "event_type": event_type}
    bound = log.bind(**{key: value for key, value in context.items() if value is not None})
    if rejected.status >= 500:
        bound.error(rejected.event, error=rejected.error)
    elif rejected.outcome in _UNVERIFIED_OUTCOMES:
        held = _UNVERIFIED_LOGGED.take()
        if held is None:
            bound.debug(rejected.event, reason=rejected.reason)
        else:
            bound.warning(rejected.event, reason=rejected.reason, refused_since_last_warning=held)
    elif rejected.error is not None:
        bound.warning(rejected.event, reason=rejected.reason, error=rejected.error)
    else:
        bound.warning(rejected.event, reason=rejected.reason)
    return _counted(_problem(rejected.status, rejected.detail), event_type, rejected.outcome)


@dataclass
class Receiver:
    """The resources of one web process, built in the lifespan (no I/O at import)."""

    secret: str = field(repr=False)
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: ArqRedis | None
    # SYNC_QUIET_SECONDS and SYNC_MAX_WAIT_SECONDS, for the syncs this receiver requests.
    window: queue.SyncWindow = field(default_factory=queue.SyncWindow)
    # Derived once per process, not per request.
    keys: tuple[bytes, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = signing_keys(self.secret)

    async def close(self) -> None:
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
                await self.redis.connection_pool.disconnect()
        await self.engine.dispose()

    # ------------------------------------------------------------------ POST /webhooks/polar

    async def receive(self, request: Request) -> JSONResponse:
        """Verify, record, request the syncs, answer 202 (200 for a delivery seen before);
        or answer the refusal."""
        received_at = utcnow()
        webhook_id: str | None = None
        event_type: str | None = None
        try:
            # The cheap refusals first: a flood of unsigned or stale requests costs no body
            # read, and nothing reaches the database or Redis before the signature holds.
            check_declared_length(request)
            webhook_id, timestamp, signature = signed_headers(request)
            check_timestamp(timestamp)
            body = await read_body(request)
            self._verify(webhook_id, timestamp, signature, body)
            raw, envelope = parse_envelope(body)
            event_type = str(envelope["type"])
            recorded = await self._record(webhook_id, event_type, raw, envelope, received_at)
        except RejectedError as rejected:
            return _refusal(rejected, webhook_id=webhook_id, event_type=event_type)

        bound = log.bind(webhook_id=webhook_id, event_type=event_type)
        if recorded.duplicate:
            bound.info("webhook_duplicate")
            return _counted(
                JSONResponse({"status": "duplicate"}, status_code=200), event_type, "duplicate"
            )
        enqueued = await self._request_syncs(recorded, bound, received_at)
        bound.info(
            "webhook_accepted",
            scopes=len(recorded.scopes),
            routed=recorded.routed,
            enqueued=enqueued,
        )
        status = "accepted" if recorded.scopes or not recorded.routed else "ignored"
        return _counted(
            JSONResponse({"status": status, "scopes": len(recorded.scopes)}, status_code=202),
            event_type,
            status,
        )

    def _verify(self, webhook_id: str, timestamp: str, signature: str, body: bytes) -> None:
        try:
            verify_signature(
                self.keys,
                webhook_id=webhook_id,
                timestamp=timestamp,
                body=body,
                signature_header=signature,
            )
        except SignatureRejectedError as exc:
            raise RejectedError(
                403, exc.reason, "signature verification failed", outcome="bad_signature"
            ) from None

    async def _record(
        self,
        webhook_id: str,
        event_type: str,
        raw: str,
        envelope: dict[str, Any],
        received_at: datetime,
    ) -> Recorded:
        """Commit the delivery and its scopes to the inbox, within Polar's patience."""

        async def record(session: AsyncSession) -> Recorded:
            return await record_delivery(
                session,
                webhook_id=webhook_id,
                event_type=event_type,
                payload=raw,
                envelope=envelope,
                now=received_at,
            )

        try:
            async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS):
                return await retry_transaction(self.sessions, record, attempts=3)
        except IntegrityError:
            # Another process committed the same webhook-id between our check and insert.
            return Recorded(duplicate=True)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise RejectedError(
                503,
                "database_unavailable",
                "database unavailable, retry later",
                outcome="db_unavailable",
                error=type(exc).__name__,
                event="webhook_database_unavailable",
            ) from None

    async def _request_syncs(self, recorded: Recorded, bound: Any, received_at: datetime) -> int:
        """Best effort: the inbox row is durable, and the sweeper covers any failure."""
        if self.redis is None or not recorded.scopes:
            return 0
        enqueued = 0
        try:
            async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
                for ref in recorded.scopes:
                    if await queue.request_sync(
                        self.redis,
                        ref.kind,
                        ref.scope_id,
                        window=self.window,
                        changed_at=received_at,
                    ):
                        enqueued += 1
        except Exception as exc:  # Redis down or slow: answer 202 anyway
            bound.warning("webhook_enqueue_failed", error=type(exc).__name__)
        return enqueued

    # ------------------------------------------------------------------ health

    async def healthz(self, _request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> JSONResponse:
        database, redis = await asyncio.gather(self._check_database(), self._check_redis())
        ready = database == "ok" and redis == "ok"
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "database": database, "redis": redis},
            status_code=200 if ready else 503,
        )

    async def _check_database(self) -> str:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any failure means not ready
            log.warning("readiness_failed", component="database", error=type(exc).__name__)
            return "unavailable"
        return "ok"

    async def _check_redis(self) -> str:
        if self.redis is None:
            return "not configured"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                await self.redis.ping()
        except Exception as exc:  # any failure means not ready
            log.warning("readiness_failed", component="redis", error=type(exc).__name__)
            return "unavailable"
        return "ok"


def create_app(settings: Settings, *, redis_url: str | None = None) -> Starlette:
    """The receiver for these settings; Redis from `redis_url`, else REDIS_URL.

    It answers only what Polar and a load balancer need: `POST /webhooks/polar`,
    `GET /healthz`, `GET /readyz`; anything else is 404. `/metrics` is not here: the
    webhook port is public, metrics are not (see `serve`)."""
    secret = settings.require_webhook_secret().get_secret_value()
    redis_url = redis_url or settings.redis_url
    holder: dict[str, Receiver] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # SQLite: poll the write lock every 3 ms, not in the busy handler's growing steps.
        # PostgreSQL: a burst waits for one of 10 pooled connections instead of opening
        # (and closing again) one per request beyond them; each delivery is one statement
        # (inbox._insert_delivery), committed on its own.
        engine = create_engine(
            settings.database_url,
            lock_poll_seconds=0.003,
            pool_size=RECEIVER_POOL_SIZE,
            max_overflow=0,
        )
        receiver = Receiver(
            secret=secret,
            engine=engine,
            sessions=session_factory(engine, autocommit=True),
            redis=lazy_redis(redis_url) if redis_url else None,
            window=queue.SyncWindow.of(settings),
        )
        holder["receiver"] = receiver
        log.info("webhook_receiver_started", redis_configured=redis_url is not None)
        try:
            yield
        finally:
            await receiver.close()
            holder.pop("receiver", None)

    def _receiver() -> Receiver:
        try:
            return holder["receiver"]
        except KeyError:
            raise RuntimeError("the receiver runs only inside its lifespan") from None

    async def receive(request: Request) -> JSONResponse:
        return await _receiver().receive(request)

    async def healthz(request: Request) -> JSONResponse:
        return await _receiver().healthz(request)

    async def readyz(request: Request) -> JSONResponse:
        return await _receiver().readyz(request)

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


@contextlib.asynccontextmanager
async def metrics_serving(
    settings: Settings, *, redis_url: str | None
) -> AsyncIterator[str | None]:
    """The web process's `/metrics` on METRICS_HOST:METRICS_PORT (nothing when unset), with
    pools of its own (one connection at a time: one refresh runs at once); yields its URL.
    A port in use fails here, before the receiver takes a webhook."""
    if settings.metrics_port is None:
        yield None
        return
    engine = create_engine(settings.database_url, pool_size=1)
    redis = lazy_redis(redis_url) if redis_url else None
    budget = (
        RedisBudget(
            redis,
            settings.polar_requests_per_minute,
            window_ms=int(settings.polar_rate_window_seconds * 1000),
        )
        if redis is not None
        else None
    )
    sessions = session_factory(engine)

    async def refresh() -> None:
        await gauges.refresh(sessions, redis=redis, budget=budget)

    server = serving.metrics_running(
        settings.metrics_port,
        refresh,
        every=settings.metrics_refresh_seconds,
        host=settings.metrics_host,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                url = await stack.enter_async_context(server)
            except OSError as exc:
                raise ConfigError(
                    f"METRICS_PORT: cannot listen on {settings.metrics_host}:"
                    f"{settings.metrics_port}: {exc.strerror or exc}"
                ) from None
            yield url
    finally:
        if redis is not None:
            with contextlib.suppress(Exception):
                await redis.aclose()
                await redis.connection_pool.disconnect()
        await engine.dispose()


async def serve(
    settings: Settings,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    redis_url: str | None = None,
    handle_signals: bool = True,
    metrics_server: bool = True,
) -> None:
    """Run the receiver under uvicorn until SIGINT/SIGTERM (when `handle_signals`) or until
    the calling task is cancelled; either way it shuts down gracefully. With
    `metrics_server` (and METRICS_PORT set), `/metrics` is served beside it on its own
    port (`seat-sync run` leaves that to its worker: one metrics server per process)."""
    app = create_app(settings, redis_url=redis_url)
    redis_url = redis_url or settings.redis_url
    async with contextlib.AsyncExitStack() as stack:
        if metrics_server:
            await stack.enter_async_context(metrics_serving(settings, redis_url=redis_url))
        await serving.serve(
            app, host=host, port=port, handle_signals=handle_signals, what="webhook receiver"
        )


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    *,
    redis_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[str]:
    """Serve the receiver inside the current event loop (tests, demo, benchmark), and
    `/metrics` on METRICS_PORT when it is set; yields the webhook URL."""
    app = create_app(settings, redis_url=redis_url)
    async with (
        metrics_serving(settings, redis_url=redis_url or settings.redis_url),
        serving.running(app, host=host, port=port, what="webhook receiver") as base_url,
    ):
        yield base_url + WEBHOOK_PATH
