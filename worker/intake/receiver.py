"""The webhook receiver (Starlette ASGI): verify -> record in the inbox -> request syncs -> 202.

It answers fast and almost never fails, because Polar disables an endpoint after ten
failed events: no Polar calls here, a capped body read, one short transaction. The
delivery and its scopes are committed before we answer; handing the syncs to Redis is
best effort, and the worker's `sweep_inbox` picks up whatever did not make it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import uvicorn
from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from worker import queue
from worker.config import Settings
from worker.intake.inbox import Recorded, record_delivery
from worker.models import utcnow
from worker.platform import metrics
from worker.platform.db import create_engine, retry_transaction, session_factory
from worker.polar.budget import RedisBudget
from worker.query import gauges

log = structlog.get_logger("worker.intake.receiver")

WEBHOOK_PATH = "/webhooks/polar"
MAX_BODY_BYTES = 1024 * 1024
TOLERANCE_SECONDS = 300
MAX_WEBHOOK_ID_LENGTH = 255
# Polar gives up after 10 s and wants an answer within 2 s.
DATABASE_TIMEOUT_SECONDS = 8.0
ENQUEUE_TIMEOUT_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 2.0


# ---------------------------------------------------------------------- verification


class SignatureRejectedError(Exception):
    """The request is not provably from Polar (the reason is safe to log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def signing_keys(secret: str) -> tuple[bytes, ...]:
    """Every key Polar may sign with for this endpoint secret.

    Polar picks the key by when the secret was generated, which a receiver cannot know:
    before 2026-09-08 it is the UTF-8 bytes of the WHOLE `whsec_…` string; since then the
    secret is `whsec_` + base64 of random bytes and the key is that base64 decoded (the
    Standard Webhooks scheme). So both are candidates, the second only when the remainder
    decodes (padding restored, as the secret may be shown without it).
    """
    legacy = secret.encode()
    remainder = secret.removeprefix("whsec_")
    try:
        decoded = base64.b64decode(remainder + "=" * (-len(remainder) % 4), validate=True)
    except binascii.Error:
        return (legacy,)
    return (legacy, decoded) if decoded and decoded != legacy else (legacy,)


def verify_signature(
    keys: Sequence[bytes],
    *,
    webhook_id: str,
    timestamp: str,
    body: bytes,
    signature_header: str,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
) -> None:
    """Raise SignatureRejectedError unless one of the space-separated `v1,<base64>` values is
    the HMAC-SHA256 of `id.timestamp.body` under one of `keys`, and the timestamp is
    within `tolerance` seconds."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise SignatureRejectedError("invalid_timestamp") from None
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance:
        raise SignatureRejectedError("stale_timestamp" if sent_at < current else "future_timestamp")
    message = f"{webhook_id}.{timestamp}.".encode() + body
    expected = [hmac.new(key, message, hashlib.sha256).digest() for key in keys]
    matched = False
    for candidate in signature_header.split():
        version, comma, value = candidate.partition(",")
        if version != "v1" or not comma:
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except binascii.Error:
            continue
        # Every value against every key, no early exit: timing says nothing about
        # which value or which key matched.
        for digest in expected:
            matched |= hmac.compare_digest(digest, given)
    if not matched:
        raise SignatureRejectedError("bad_signature")


# ---------------------------------------------------------------------- request parsing


class BodyTooLargeError(Exception):
    pass


class BadRequestError(Exception):
    pass


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refusing more than `limit` bytes whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise BadRequestError("invalid content-length") from None
        if length > limit:
            raise BodyTooLargeError
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError
        chunks.append(chunk)
    return b"".join(chunks)


def parse_envelope(body: bytes) -> tuple[str, dict[str, Any]]:
    """The raw text and the envelope object; BadRequestError unless it is an object with a type."""
    try:
        raw = body.decode("utf-8")
        envelope = json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested beyond reason
        raise BadRequestError("body is not JSON") from None
    if not isinstance(envelope, dict):
        raise BadRequestError("body is not a JSON object")
    event_type = envelope.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise BadRequestError("body has no event type")
    if _has_nul(envelope):
        # PostgreSQL text cannot hold NUL: refuse it (400) rather than fail the commit
        # (503) on every one of Polar's retries until it disables the endpoint.
        raise BadRequestError("body contains NUL characters")
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


def lazy_redis(url: str) -> ArqRedis:
    """A Redis client that connects on first use, so a Redis outage at startup or at
    request time costs one quick failed attempt, never the process."""
    pool = ConnectionPool.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
    return ArqRedis(pool, default_queue_name=queue.QUEUE_NAME)


@dataclass
class Receiver:
    """The resources of one web process, built in the lifespan (no I/O at import)."""

    secret: str = field(repr=False)
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: ArqRedis | None
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
        received_at = utcnow()
        try:
            body = await read_body(request)
        except BodyTooLargeError:
            log.warning("webhook_rejected", reason="body_too_large")
            return _counted(
                _problem(413, f"body larger than {MAX_BODY_BYTES} bytes"), None, "too_large"
            )
        except BadRequestError as exc:
            log.warning("webhook_rejected", reason="bad_content_length")
            return _counted(_problem(400, str(exc)), None, "bad_request")

        webhook_id = request.headers.get("webhook-id", "").strip()
        timestamp = request.headers.get("webhook-timestamp", "").strip()
        signature = request.headers.get("webhook-signature", "").strip()
        if not (webhook_id and timestamp and signature):
            log.warning("webhook_rejected", reason="missing_headers")
            return _counted(
                _problem(400, "webhook-id, webhook-timestamp and webhook-signature required"),
                None,
                "bad_request",
            )
        if len(webhook_id) > MAX_WEBHOOK_ID_LENGTH:
            log.warning("webhook_rejected", reason="webhook_id_too_long")
            return _counted(_problem(400, "webhook-id too long"), None, "bad_request")
        bound = log.bind(webhook_id=webhook_id)
        try:
            verify_signature(
                self.keys,
                webhook_id=webhook_id,
                timestamp=timestamp,
                body=body,
                signature_header=signature,
            )
        except SignatureRejectedError as exc:
            bound.warning("webhook_rejected", reason=exc.reason)
            return _counted(_problem(403, "signature verification failed"), None, "bad_signature")

        try:
            raw, envelope = parse_envelope(body)
        except BadRequestError as exc:
            bound.warning("webhook_rejected", reason="bad_payload", error=str(exc))
            return _counted(_problem(400, str(exc)), None, "bad_payload")
        event_type: str = envelope["type"]
        bound = bound.bind(event_type=event_type)

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
                recorded = await retry_transaction(self.sessions, record, attempts=3)
        except IntegrityError:
            # Another process committed the same webhook-id between our check and insert.
            recorded = Recorded(duplicate=True)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            bound.error("webhook_database_unavailable", error=type(exc).__name__)
            return _counted(
                _problem(503, "database unavailable, retry later"), event_type, "db_unavailable"
            )

        if recorded.duplicate:
            bound.info("webhook_duplicate")
            return _counted(
                JSONResponse({"status": "duplicate"}, status_code=200), event_type, "duplicate"
            )

        enqueued = await self._request_syncs(recorded, bound)
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

    async def _request_syncs(self, recorded: Recorded, bound: Any) -> int:
        """Best effort: the inbox row is durable, and the sweeper covers any failure."""
        if self.redis is None or not recorded.scopes:
            return 0
        enqueued = 0
        try:
            async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
                for ref in recorded.scopes:
                    if await queue.request_sync(self.redis, ref.kind, ref.scope_id):
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
    """The receiver for these settings; Redis from `redis_url`, else REDIS_URL."""
    secret = settings.require_webhook_secret().get_secret_value()
    redis_url = redis_url or settings.redis_url
    holder: dict[str, Receiver] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url)
        receiver = Receiver(
            secret=secret,
            engine=engine,
            sessions=session_factory(engine),
            redis=lazy_redis(redis_url) if redis_url else None,
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

    async def metrics_route(_request: Request) -> Response:
        receiver = _receiver()
        budget = (
            RedisBudget(
                receiver.redis,
                settings.polar_requests_per_minute,
                window_ms=int(settings.polar_rate_window_seconds * 1000),
            )
            if receiver.redis is not None
            else None
        )
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS * 2):
            await gauges.refresh(receiver.sessions, redis=receiver.redis, budget=budget)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def healthz(request: Request) -> JSONResponse:
        return await _receiver().healthz(request)

    async def readyz(request: Request) -> JSONResponse:
        return await _receiver().readyz(request)

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, receive, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the caller owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def uvicorn_config(app: Starlette, *, host: str, port: int) -> uvicorn.Config:
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
    settings: Settings,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    redis_url: str | None = None,
    handle_signals: bool = True,
) -> None:
    """Run the receiver under uvicorn until SIGINT/SIGTERM (when `handle_signals`) or until
    the calling task is cancelled; either way it shuts down gracefully."""
    app = create_app(settings, redis_url=redis_url)
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
        raise RuntimeError(f"webhook receiver failed to start on {host}:{port}")


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    *,
    redis_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[str]:
    """Serve the receiver inside the current event loop (tests, demo, benchmark) on a
    socket bound here, so the port is known before serving; yields the webhook URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket says TCP, and without it each response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    bound_port = sock.getsockname()[1]
    app = create_app(settings, redis_url=redis_url)
    config = uvicorn_config(app, host=host, port=bound_port)
    config.timeout_graceful_shutdown = 1
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("webhook receiver failed to start")
            await asyncio.sleep(0.005)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        yield f"http://{shown}:{bound_port}{WEBHOOK_PATH}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
