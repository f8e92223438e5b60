"""The webhook receiver over loopback HTTP: Polar's signature, status codes, durable inbox."""

from __future__ import annotations

import asyncio
import json
import socket
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
from tests.support.polar_signing import (
    GENERATIONS,
    Generation,
    new_secret,
    new_standard_secret,
    polar_headers,
    polar_signature_header,
)
from worker import queue
from worker.config import Settings
from worker.intake.receiver import MAX_BODY_BYTES, running, serve
from worker.intake.signature import SignatureRejectedError, signing_keys, verify_signature
from worker.models import WebhookDelivery, WebhookDeliveryScope
from worker.platform.db import create_engine, session_factory

# Polar's published test vector, signed with the legacy key (the whole secret's bytes).
VECTOR_SECRET = "whsec_ovyN6cPrTv56AApvzCaJno08SSmGJmgbWilb33N2JuK"
VECTOR_ID = "0f3e8f8e-5a1b-4c2d-9e7f-1a2b3c4d5e6f"
VECTOR_TIMESTAMP = "1767225600"
VECTOR_BODY = (
    b'{"type":"customer_seat.revoked","timestamp":"2026-01-01T00:00:00Z",'
    b'"data":{"id":"9b1c0c1e-2f2a-4d8e-8a55-0c1b6f3c8e11"}}'
)
VECTOR_SIGNATURE = "v1,MixzmdTOx+QJmVdDnQ0mG73viqr8GXB8/GD33dDX80w="

# A vector of the standard kind (secrets generated since 2026-09-08), computed by hand from
# Polar's rule, not by any code in this repository:
#   KEY_HEX=$(printf %s 'polar-seat-sync standard-kind test vector' \
#     | openssl dgst -sha256 -hex | awk '{print $NF}')
#   SECRET="whsec_$(printf %s "$KEY_HEX" | xxd -r -p | base64)"
#   printf '%s.%s.%s' "$ID" "$TIMESTAMP" "$BODY" \
#     | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KEY_HEX -binary | base64
# The body is a complete `customer_seat.revoked` payload, so the SDK loads it too.
STANDARD_VECTOR_SECRET = "whsec_/0QnQbklkQ6wL4zZP62qlHMhIfGk9CutYdCpTqybsJI="
STANDARD_VECTOR_ID = "3c2b1a09-8f7e-4d6c-9b5a-0e1f2a3b4c5d"
STANDARD_VECTOR_TIMESTAMP = "1790812800"  # 2026-10-01T00:00:00Z
STANDARD_VECTOR_BODY = (
    b'{"type":"customer_seat.revoked","timestamp":"2026-10-01T00:00:00Z",'
    b'"api_version":"2026-10","data":{"created_at":"2026-09-30T12:00:00Z",'
    b'"modified_at":"2026-10-01T00:00:00Z","id":"9b1c0c1e-2f2a-4d8e-8a55-0c1b6f3c8e11",'
    b'"subscription_id":"5d3c1a9e-0000-4000-8000-000000000001","order_id":null,'
    b'"status":"revoked","customer_id":null,"member_id":null,"member":null,"email":null,'
    b'"customer_email":null,"invitation_token_expires_at":"2026-10-01T12:00:00Z",'
    b'"claimed_at":null,"revoked_at":"2026-10-01T00:00:00Z","seat_metadata":{}}}'
)
STANDARD_VECTOR_SIGNATURE = "v1,LS9CFxBHKy8MnbyxHxNhXBYLU8y+B5Xl4uhMKbHeT3M="

# This module's endpoint: a secret of the kind Polar generates today.
WEBHOOK_SECRET = new_standard_secret()
SUBSCRIPTION_ID = "5d3c1a9e-0000-4000-8000-000000000001"


# ---------------------------------------------------------------------- helpers


def make_settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        polar_access_token="polar_oat_unused",
        polar_api_url="http://127.0.0.1:9",
        polar_webhook_secret=WEBHOOK_SECRET,
        log_format="json",
    )


def envelope(event_type: str, data: dict[str, Any]) -> bytes:
    body = {"type": event_type, "timestamp": "2026-01-01T00:00:00Z", "data": data}
    return json.dumps(body, separators=(",", ":")).encode()


def seat_event(subscription_id: str = SUBSCRIPTION_ID) -> bytes:
    return envelope(
        "customer_seat.assigned",
        {"id": str(uuid.uuid4()), "subscription_id": subscription_id, "order_id": None},
    )


def signed_headers(
    body: bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    generation: Generation = "legacy",
    webhook_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """Headers as Polar sends them. The legacy key by default because it exists for any
    secret string (other modules sign with made-up ones); pass the generation to choose."""
    return polar_headers(secret, generation, body, webhook_id=webhook_id, timestamp=timestamp)


async def stored(settings: Settings) -> tuple[int, int]:
    """(deliveries, delivery scopes) in the inbox."""
    engine = create_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            deliveries = await session.scalar(select(func.count()).select_from(WebhookDelivery))
            scopes = await session.scalar(select(func.count()).select_from(WebhookDeliveryScope))
    finally:
        await engine.dispose()
    return int(deliveries or 0), int(scopes or 0)


async def delivery(settings: Settings, webhook_id: str) -> WebhookDelivery | None:
    engine = create_engine(settings.database_url)
    try:
        async with session_factory(engine)() as session:
            return await session.get(WebhookDelivery, webhook_id)
    finally:
        await engine.dispose()


async def queued_jobs(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return int(await client.zcard(queue.QUEUE_NAME))
    finally:
        await client.aclose()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def verify(secret: str, *, now: int, **message: Any) -> None:
    """verify_signature on the legacy vector's message, with any part replaced."""
    verify_signature(
        signing_keys(secret),
        webhook_id=message.get("webhook_id", VECTOR_ID),
        timestamp=message.get("timestamp", VECTOR_TIMESTAMP),
        body=message.get("body", VECTOR_BODY),
        signature_header=message.get("signature_header", VECTOR_SIGNATURE),
        now=now,
    )


def test_polars_legacy_test_vector_is_accepted() -> None:
    assert (
        polar_signature_header(VECTOR_SECRET, "legacy", VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
        == VECTOR_SIGNATURE
    )
    verify(VECTOR_SECRET, now=int(VECTOR_TIMESTAMP) + 10)


def test_standard_kind_test_vector_is_accepted() -> None:
    assert (
        polar_signature_header(
            STANDARD_VECTOR_SECRET,
            "standard",
            STANDARD_VECTOR_ID,
            STANDARD_VECTOR_TIMESTAMP,
            STANDARD_VECTOR_BODY,
        )
        == STANDARD_VECTOR_SIGNATURE
    )
    verify(
        STANDARD_VECTOR_SECRET,
        webhook_id=STANDARD_VECTOR_ID,
        timestamp=STANDARD_VECTOR_TIMESTAMP,
        body=STANDARD_VECTOR_BODY,
        signature_header=STANDARD_VECTOR_SIGNATURE,
        now=int(STANDARD_VECTOR_TIMESTAMP) - 10,
    )


def test_a_standard_secret_shown_without_padding_still_verifies() -> None:
    unpadded = STANDARD_VECTOR_SECRET.rstrip("=")
    assert unpadded != STANDARD_VECTOR_SECRET
    verify(
        unpadded,
        webhook_id=STANDARD_VECTOR_ID,
        timestamp=STANDARD_VECTOR_TIMESTAMP,
        body=STANDARD_VECTOR_BODY,
        signature_header=STANDARD_VECTOR_SIGNATURE,
        now=int(STANDARD_VECTOR_TIMESTAMP),
    )


def test_a_secret_that_is_not_base64_has_only_the_legacy_key() -> None:
    secret = "whsec_not-base64_at_all!"
    assert signing_keys(secret) == (secret.encode(),)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_either_key_verifies_a_fresh_secret(generation: Generation) -> None:
    secret = new_standard_secret()
    header = polar_signature_header(secret, generation, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
    verify(secret, signature_header=header, now=int(VECTOR_TIMESTAMP))


@pytest.mark.parametrize("generation", GENERATIONS)
def test_any_one_of_several_signatures_is_enough(generation: Generation) -> None:
    good = polar_signature_header(
        STANDARD_VECTOR_SECRET, generation, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY
    )
    header = f"v1,AAAA v1,not*base64 v2,{good[3:]} v1{good[3:]} {good} v1,{'A' * 44}"
    verify(STANDARD_VECTOR_SECRET, signature_header=header, now=int(VECTOR_TIMESTAMP))


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"secret": "wrong"}, "bad_signature"),
        ({"body": VECTOR_BODY.replace(b"revoked", b"claimed")}, "bad_signature"),
        ({"webhook_id": VECTOR_ID.replace("0", "1")}, "bad_signature"),
        ({"timestamp": str(int(VECTOR_TIMESTAMP) + 1)}, "bad_signature"),
        ({"v2": True}, "bad_signature"),
        ({"now": int(VECTOR_TIMESTAMP) + 301}, "stale_timestamp"),
        ({"now": int(VECTOR_TIMESTAMP) - 301}, "future_timestamp"),
        ({"timestamp": "yesterday"}, "invalid_timestamp"),
    ],
    ids=["wrong_secret", "body", "id", "timestamp", "v2", "stale", "future", "garbage_ts"],
)
def test_verification_rejects(generation: Generation, change: dict[str, Any], reason: str) -> None:
    secret = new_secret(generation)
    header = polar_signature_header(secret, generation, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
    if change.get("v2"):
        header = header.replace("v1,", "v2,")
    checked = new_secret(generation) if change.get("secret") else secret
    message = {k: v for k, v in change.items() if k in ("body", "webhook_id", "timestamp")}
    with pytest.raises(SignatureRejectedError) as raised:
        verify(
            checked,
            signature_header=header,
            now=change.get("now", int(VECTOR_TIMESTAMP)),
            **message,
        )
    assert raised.value.reason == reason


def test_timestamps_within_five_minutes_are_accepted() -> None:
    for skew in (-300, 300):
        verify(VECTOR_SECRET, now=int(VECTOR_TIMESTAMP) + skew)


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


async def test_redis_down_still_acknowledges_a_durable_delivery(
    receiver_settings: Settings, client: httpx.AsyncClient
) -> None:
    dead_redis = f"redis://127.0.0.1:{closed_port()}/0"
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
    settings = make_settings(f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere")
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
    port = closed_port()
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
        for _ in range(200):
            try:
                response = await client.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.02)
        else:
            pytest.fail("the receiver never came up")
        assert response.status_code == 200
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{port}/healthz")


async def test_logs_never_carry_the_secret_or_signatures(
    url: str, client: httpx.AsyncClient
) -> None:
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
