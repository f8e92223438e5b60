"""The webhook receiver over loopback HTTP: Polar's signature, status codes, durable inbox."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import structlog
import structlog.testing
from sqlalchemy import func, select

import worker.intake.receiver
from tests.support.mirror import reading
from tests.support.polar_signing import (
    GENERATIONS,
    Generation,
    new_secret,
    new_standard_secret,
)
from tests.support.ports import free_port
from tests.support.settings import WEBHOOK_SECRET, make_settings
from tests.support.waiting import until_answering
from tests.support.webhooks import (
    LEGACY_VECTOR,
    STANDARD_VECTOR,
    Vector,
    envelope,
    signed_headers,
)
from worker import queue
from worker.config import Settings
from worker.intake import receiver
from worker.intake.receiver import MAX_BODY_BYTES, RECEIVER_POOL_SIZE, running, serve
from worker.intake.signature import SignatureRejectedError, signing_keys, verify_signature
from worker.models import WebhookDelivery, WebhookDeliveryScope

SUBSCRIPTION_ID = "5d3c1a9e-0000-4000-8000-000000000001"


# ---------------------------------------------------------------------- helpers


def seat_event(subscription_id: str = SUBSCRIPTION_ID) -> bytes:
    return envelope(
        "customer_seat.assigned",
        {"id": str(uuid.uuid4()), "subscription_id": subscription_id, "order_id": None},
    )


async def stored(settings: Settings) -> tuple[int, int]:
    """(deliveries, delivery scopes) in the inbox."""
    async with reading(settings.database_url) as session:
        deliveries = await session.scalar(select(func.count()).select_from(WebhookDelivery))
        scopes = await session.scalar(select(func.count()).select_from(WebhookDeliveryScope))
    return int(deliveries or 0), int(scopes or 0)


async def delivery(settings: Settings, webhook_id: str) -> WebhookDelivery | None:
    async with reading(settings.database_url) as session:
        return await session.get(WebhookDelivery, webhook_id)


async def queued_jobs(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return int(await client.zcard(queue.QUEUE_NAME))
    finally:
        await client.aclose()


@pytest.fixture
def receiver_settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def url(receiver_settings: Settings, redis_url: str) -> AsyncIterator[str]:
    async with running(receiver_settings, redis_url=redis_url) as webhook_url:
        yield webhook_url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


# ---------------------------------------------------------------------- signature


def verify(secret: str, *, now: int, vector: Vector = LEGACY_VECTOR, **message: Any) -> None:
    """verify_signature on a vector's message (the legacy one's unless told), with any part
    replaced."""
    verify_signature(
        signing_keys(secret),
        webhook_id=message.get("webhook_id", vector.webhook_id),
        timestamp=message.get("timestamp", vector.timestamp),
        body=message.get("body", vector.body),
        signature_header=message.get("signature_header", vector.signature),
        now=now,
    )


def test_polars_legacy_test_vector_is_accepted() -> None:
    assert LEGACY_VECTOR.signed_by(LEGACY_VECTOR.secret, "legacy") == LEGACY_VECTOR.signature
    verify(LEGACY_VECTOR.secret, now=LEGACY_VECTOR.sent_at + 10)


def test_standard_kind_test_vector_is_accepted() -> None:
    assert (
        STANDARD_VECTOR.signed_by(STANDARD_VECTOR.secret, "standard") == STANDARD_VECTOR.signature
    )
    verify(STANDARD_VECTOR.secret, vector=STANDARD_VECTOR, now=STANDARD_VECTOR.sent_at - 10)


def test_a_standard_secret_shown_without_padding_still_verifies() -> None:
    unpadded = STANDARD_VECTOR.secret.rstrip("=")
    assert unpadded != STANDARD_VECTOR.secret
    verify(unpadded, vector=STANDARD_VECTOR, now=STANDARD_VECTOR.sent_at)


def test_a_secret_that_is_not_base64_has_only_the_legacy_key() -> None:
    secret = "whsec_not-base64_at_all!"
    assert signing_keys(secret) == (secret.encode(),)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_either_key_verifies_a_fresh_secret(generation: Generation) -> None:
    secret = new_standard_secret()
    header = LEGACY_VECTOR.signed_by(secret, generation)
    verify(secret, signature_header=header, now=LEGACY_VECTOR.sent_at)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_any_one_of_several_signatures_is_enough(generation: Generation) -> None:
    good = LEGACY_VECTOR.signed_by(STANDARD_VECTOR.secret, generation)
    header = f"v1,AAAA v1,not*base64 v2,{good[3:]} v1{good[3:]} {good} v1,{'A' * 44}"
    verify(STANDARD_VECTOR.secret, signature_header=header, now=LEGACY_VECTOR.sent_at)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"secret": "wrong"}, "bad_signature"),
        ({"body": LEGACY_VECTOR.body.replace(b"revoked", b"claimed")}, "bad_signature"),
        ({"webhook_id": LEGACY_VECTOR.webhook_id.replace("0", "1")}, "bad_signature"),
        ({"timestamp": str(LEGACY_VECTOR.sent_at + 1)}, "bad_signature"),
        ({"v2": True}, "bad_signature"),
        ({"now": LEGACY_VECTOR.sent_at + 301}, "stale_timestamp"),
        ({"now": LEGACY_VECTOR.sent_at - 301}, "future_timestamp"),
        ({"timestamp": "yesterday"}, "invalid_timestamp"),
    ],
    ids=["wrong_secret", "body", "id", "timestamp", "v2", "stale", "future", "garbage_ts"],
)
def test_verification_rejects(generation: Generation, change: dict[str, Any], reason: str) -> None:
    secret = new_secret(generation)
    header = LEGACY_VECTOR.signed_by(secret, generation)
    if change.get("v2"):
        header = header.replace("v1,", "v2,")
    checked = new_secret(generation) if change.get("secret") else secret
    message = {k: v for k, v in change.items() if k in ("body", "webhook_id", "timestamp")}
    with pytest.raises(SignatureRejectedError) as raised:
        verify(
            checked,
            signature_header=header,
            now=change.get("now", LEGACY_VECTOR.sent_at),
            **message,
        )
    assert raised.value.reason == reason


def test_timestamps_within_five_minutes_are_accepted() -> None:
    for skew in (-300, 300):
        verify(LEGACY_VECTOR.secret, now=LEGACY_VECTOR.sent_at + skew)


# ---------------------------------------------------------------------- receiver


async def test_signed_delivery_is_committed_with_its_scope_and_a_sync_requested(
    url: str, client: httpx.AsyncClient, receiver_settings: Settings, redis_url: str
) -> None:
    body = seat_event()
    headers = signed_headers(body)
    response = await client.post(url, content=body, headers=headers)
    assert response.status_code == 202
    row = await delivery(receiver_settings, headers["webhook-id"])
    assert row is not None
    assert row.payload == body.decode()
    assert row.event_type == "customer_seat.assigned"
    assert row.routed_at is not None and row.processed_at is None
    assert await stored(receiver_settings) == (1, 1)
    assert await queued_jobs(redis_url) == 1


@pytest.mark.parametrize("generation", GENERATIONS)
async def test_a_delivery_signed_with_either_key_is_accepted(
    url: str, client: httpx.AsyncClient, receiver_settings: Settings, generation: Generation
) -> None:
    body = seat_event()
    headers = signed_headers(body, generation=generation)
    response = await client.post(url, content=body, headers=headers)
    assert response.status_code == 202
    assert await delivery(receiver_settings, headers["webhook-id"]) is not None


async def test_signing_keys_are_derived_once_per_process_not_per_request(
    receiver_settings: Settings,
    redis_url: str,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    derived: list[int] = []

    def counting(secret: str) -> tuple[bytes, ...]:
        derived.append(1)
        return signing_keys(secret)

    monkeypatch.setattr(worker.intake.receiver, "signing_keys", counting)
    async with running(receiver_settings, redis_url=redis_url) as hook_url:
        for generation in (*GENERATIONS, *GENERATIONS):
            body = seat_event()
            headers = signed_headers(body, generation=generation)
            assert (await client.post(hook_url, content=body, headers=headers)).status_code == 202
    assert len(derived) == 1


def _tampered(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body.replace(b"assigned", b"claimed"), headers


def _wrong_legacy_secret(body: bytes, _headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(body, secret=new_secret("legacy"), generation="legacy")


def _wrong_standard_secret(body: bytes, _headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(body, secret=new_secret("standard"), generation="standard")


def _stale(body: bytes, _headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(body, timestamp=int(time.time()) - 301)


def _future(body: bytes, _headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(body, timestamp=int(time.time()) + 301)


def _no_signature(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body, {k: v for k, v in headers.items() if k != "webhook-signature"}


def _no_id(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body, {k: v for k, v in headers.items() if k != "webhook-id"}


def _garbage_signature(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body, {**headers, "webhook-signature": "v1,bm9wZQ=="}


def _not_json(_body: bytes, _headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    body = b'{"type": "customer_seat.assigned", '
    return body, signed_headers(body)


def _not_object(_body: bytes, _headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    body = b'["customer_seat.assigned"]'
    return body, signed_headers(body)


def _no_type(_body: bytes, _headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    body = b'{"data": {"subscription_id": "x"}}'
    return body, signed_headers(body)


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (_tampered, 403),
        (_wrong_legacy_secret, 403),
        (_wrong_standard_secret, 403),
        (_stale, 403),
        (_future, 403),
        (_garbage_signature, 403),
        (_no_signature, 400),
        (_no_id, 400),
        (_not_json, 400),
        (_not_object, 400),
        (_no_type, 400),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)).strip("_"),
)
async def test_rejected_request_stores_nothing(
    url: str,
    client: httpx.AsyncClient,
    receiver_settings: Settings,
    redis_url: str,
    mutate: Any,
    status: int,
) -> None:
    body = seat_event()
    body, headers = mutate(body, signed_headers(body))
    response = await client.post(url, content=body, headers=headers)
    assert response.status_code == status
    assert WEBHOOK_SECRET not in response.text
    assert await stored(receiver_settings) == (0, 0)
    assert await queued_jobs(redis_url) == 0


async def test_body_over_one_mebibyte_is_refused_by_its_declared_length(
    url: str, client: httpx.AsyncClient, receiver_settings: Settings
) -> None:
    body = envelope("customer_seat.assigned", {"pad": "x" * MAX_BODY_BYTES})
    response = await client.post(url, content=body, headers=signed_headers(body))
    assert response.status_code == 413
    assert await stored(receiver_settings) == (0, 0)


async def test_streamed_body_over_one_mebibyte_is_refused_without_a_length(
    url: str, client: httpx.AsyncClient, receiver_settings: Settings
) -> None:
    body = envelope("customer_seat.assigned", {"pad": "x" * MAX_BODY_BYTES})

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = await client.post(url, content=chunks(), headers=signed_headers(body))
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert await stored(receiver_settings) == (0, 0)


async def test_unknown_event_type_is_accepted_recorded_and_ignored(
    url: str, client: httpx.AsyncClient, receiver_settings: Settings, redis_url: str
) -> None:
    body = envelope("checkout.updated", {"id": "c1"})
    headers = signed_headers(body)
    response = await client.post(url, content=body, headers=headers)
    assert response.status_code == 202
    row = await delivery(receiver_settings, headers["webhook-id"])
    assert row is not None
    assert row.outcome == "ignored" and row.processed_at is not None
    assert await stored(receiver_settings) == (1, 0)
    assert await queued_jobs(redis_url) == 0


async def test_redelivery_is_answered_without_new_rows_or_work(
    url: str, client: httpx.AsyncClient, receiver_settings: Settings, redis_url: str
) -> None:
    body = seat_event()
    first = signed_headers(body)
    assert (await client.post(url, content=body, headers=first)).status_code == 202
    # Redis forgets the coalescing flag, so only the inbox can tell this is a redelivery.
    client_redis = aioredis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    await client_redis.aclose()
    again = signed_headers(body, webhook_id=first["webhook-id"], timestamp=int(time.time()) + 1)
    response = await client.post(url, content=body, headers=again)
    assert response.status_code == 200
    assert response.json()["status"] == "duplicate"
    assert await stored(receiver_settings) == (1, 1)
    assert await queued_jobs(redis_url) == 0


async def test_concurrent_redeliveries_store_one_row(
    url: str, client: httpx.AsyncClient, receiver_settings: Settings
) -> None:
    body = seat_event()
    webhook_id = f"msg_{uuid.uuid4().hex}"
    responses = await asyncio.gather(
        *(
            client.post(url, content=body, headers=signed_headers(body, webhook_id=webhook_id))
            for _ in range(8)
        )
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(202) == 1
    assert set(codes) <= {200, 202}
    assert await stored(receiver_settings) == (1, 1)


async def test_a_burst_beyond_the_connection_pool_is_answered_and_stored_in_full(
    url: str, client: httpx.AsyncClient, receiver_settings: Settings
) -> None:
    # Five times the receiver's PostgreSQL pool (no overflow): requests wait their turn.
    count = 5 * RECEIVER_POOL_SIZE
    bodies = [seat_event(str(uuid.uuid4())) for _ in range(count)]

    responses = await asyncio.gather(
        *(client.post(url, content=body, headers=signed_headers(body)) for body in bodies)
    )

    assert [r.status_code for r in responses] == [202] * count
    assert await stored(receiver_settings) == (count, count)


async def test_redis_down_still_acknowledges_a_durable_delivery(
    receiver_settings: Settings, client: httpx.AsyncClient
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    async with running(receiver_settings, redis_url=dead_redis) as url:
        body = seat_event()
        started = time.monotonic()
        response = await client.post(url, content=body, headers=signed_headers(body))
        elapsed = time.monotonic() - started
        ready = await client.get(url.replace("/webhooks/polar", "/readyz"))
    assert response.status_code == 202
    assert elapsed < 2.0
    assert await stored(receiver_settings) == (1, 1)
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "database": "ok", "redis": "unavailable"}


async def test_database_down_answers_503(redis_url: str, client: httpx.AsyncClient) -> None:
    settings = make_settings(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    async with running(settings, redis_url=redis_url) as url:
        body = seat_event()
        response = await client.post(url, content=body, headers=signed_headers(body))
        ready = await client.get(url.replace("/webhooks/polar", "/readyz"))
    assert response.status_code == 503
    assert ready.status_code == 503
    assert ready.json()["database"] == "unavailable"
    assert ready.json()["redis"] == "ok"
    assert await queued_jobs(redis_url) == 0


async def test_health_and_readiness(url: str, client: httpx.AsyncClient) -> None:
    base = url.removesuffix("/webhooks/polar")
    health = await client.get(base + "/healthz")
    ready = await client.get(base + "/readyz")
    assert health.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "redis": "ok"}


async def test_serve_runs_until_cancelled(
    receiver_settings: Settings, redis_url: str, client: httpx.AsyncClient
) -> None:
    port = free_port()
    task = asyncio.create_task(
        serve(
            receiver_settings,
            host="127.0.0.1",
            port=port,
            redis_url=redis_url,
            handle_signals=False,
        )
    )
    try:
        await until_answering(
            f"http://127.0.0.1:{port}/healthz", within=5, what="the receiver up", every=0.02
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{port}/healthz")


async def test_logs_never_carry_the_secret_or_signatures(
    url: str, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unverified refusals are logged once per 10 s per process: start a fresh window, so
    # the refusal below is logged whatever the tests before it refused.
    monkeypatch.setattr(receiver, "_UNVERIFIED_LOGGED", receiver._Sampler(10.0))
    body = seat_event()
    good = signed_headers(body)
    bad = signed_headers(body, secret="whsec_" + "z" * 32)
    with structlog.testing.capture_logs() as entries:
        assert (await client.post(url, content=body, headers=bad)).status_code == 403
        assert (await client.post(url, content=body, headers=good)).status_code == 202
    assert [e["event"] for e in entries] == ["webhook_rejected", "webhook_accepted"]
    text = repr(entries)
    for secret_ish in (WEBHOOK_SECRET, good["webhook-signature"], bad["webhook-signature"]):
        assert secret_ish not in text
