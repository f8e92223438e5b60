"""Webhook deliveries as tests build and send them: Polar's signature test vectors, event
envelopes, headers signed as Polar signs them, and the receiver's app in this process."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from tests.support.polar_signing import Generation, polar_headers, polar_signature_header
from tests.support.settings import WEBHOOK_SECRET
from worker.config import Settings
from worker.intake.receiver import create_app


@dataclass(frozen=True)
class Vector:
    """One delivery signed by hand: the endpoint's secret, the message, its signature."""

    secret: str
    webhook_id: str
    timestamp: str
    body: bytes
    signature: str

    @property
    def sent_at(self) -> int:
        """The timestamp as Unix seconds."""
        return int(self.timestamp)

    def headers(self) -> dict[str, str]:
        """The delivery's headers as Polar sends them."""
        return {
            "webhook-id": self.webhook_id,
            "webhook-timestamp": self.timestamp,
            "webhook-signature": self.signature,
        }

    def signed_by(self, secret: str, generation: Generation) -> str:
        """The `webhook-signature` of this message under `secret`'s key of `generation`."""
        return polar_signature_header(
            secret, generation, self.webhook_id, self.timestamp, self.body
        )


# Polar's published test vector, signed with the legacy key (the whole secret's bytes).
LEGACY_VECTOR = Vector(
    secret="whsec_ovyN6cPrTv56AApvzCaJno08SSmGJmgbWilb33N2JuK",
    webhook_id="0f3e8f8e-5a1b-4c2d-9e7f-1a2b3c4d5e6f",
    timestamp="1767225600",
    body=(
        b'{"type":"customer_seat.revoked","timestamp":"2026-01-01T00:00:00Z",'
        b'"data":{"id":"9b1c0c1e-2f2a-4d8e-8a55-0c1b6f3c8e11"}}'
    ),
    signature="v1,MixzmdTOx+QJmVdDnQ0mG73viqr8GXB8/GD33dDX80w=",
)

# A vector of the standard kind (secrets generated since 2026-09-08), computed by hand from
# Polar's rule, not by any code in this repository:
#   KEY_HEX=$(printf %s 'polar-seat-sync standard-kind test vector' \
#     | openssl dgst -sha256 -hex | awk '{print $NF}')
#   SECRET="whsec_$(printf %s "$KEY_HEX" | xxd -r -p | base64)"
#   printf '%s.%s.%s' "$ID" "$TIMESTAMP" "$BODY" \
#     | openssl dgst -sha256 -mac HMAC -macopt hexkey:$KEY_HEX -binary | base64
# The body is a complete `customer_seat.revoked` payload, so the SDK loads it too.
STANDARD_VECTOR = Vector(
    secret="whsec_/0QnQbklkQ6wL4zZP62qlHMhIfGk9CutYdCpTqybsJI=",
    webhook_id="3c2b1a09-8f7e-4d6c-9b5a-0e1f2a3b4c5d",
    timestamp="1790812800",  # 2026-10-01T00:00:00Z
    body=(
        b'{"type":"customer_seat.revoked","timestamp":"2026-10-01T00:00:00Z",'
        b'"api_version":"2026-10","data":{"created_at":"2026-09-30T12:00:00Z",'
        b'"modified_at":"2026-10-01T00:00:00Z","id":"9b1c0c1e-2f2a-4d8e-8a55-0c1b6f3c8e11",'
        b'"subscription_id":"5d3c1a9e-0000-4000-8000-000000000001","order_id":null,'
        b'"status":"revoked","customer_id":null,"member_id":null,"member":null,"email":null,'
        b'"customer_email":null,"invitation_token_expires_at":"2026-10-01T12:00:00Z",'
        b'"claimed_at":null,"revoked_at":"2026-10-01T00:00:00Z","seat_metadata":{}}}'
    ),
    signature="v1,LS9CFxBHKy8MnbyxHxNhXBYLU8y+B5Xl4uhMKbHeT3M=",
)


def envelope(event_type: str, data: dict[str, Any]) -> bytes:
    """An event's body as Polar sends it: type, timestamp and data, compact JSON."""
    body = {"type": event_type, "timestamp": "2026-01-01T00:00:00Z", "data": data}
    return json.dumps(body, separators=(",", ":")).encode()


def signed_headers(
    body: bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    generation: Generation = "legacy",
    webhook_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """Headers as Polar sends them, for the tests' endpoint secret unless told otherwise.
    The legacy key by default because it exists for any secret string (tests sign with
    made-up ones too); pass the generation to choose."""
    return polar_headers(secret, generation, body, webhook_id=webhook_id, timestamp=timestamp)


@contextlib.asynccontextmanager
async def receiver_client(
    settings: Settings, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """The receiver's real Starlette app, its lifespan included, over an in-process
    transport (no socket, no Redis): fast enough for hypothesis. With
    `raise_app_exceptions=False` an unhandled error is answered 500 instead of raised."""
    app = create_app(settings, redis_url=None)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions),
            base_url="http://receiver",
        ) as client,
    ):
        yield client
