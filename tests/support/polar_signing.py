"""Webhook signing as Polar does it, written from Polar's rule, not from the receiver.

Polar signs `"{webhook-id}.{webhook-timestamp}.{raw body}"` with HMAC-SHA256 and sends
`webhook-signature: v1,<base64 digest>`. The key depends on when the endpoint's secret was
generated:

- "legacy" (before 2026-09-08): the UTF-8 bytes of the whole secret, `whsec_` included;
- "standard" (since then; every endpoint created today): the secret is `whsec_` + base64
  of 32 random bytes and the key is those bytes (the Standard Webhooks scheme).

Tests sign with this module so that the receiver is never its own oracle; a test checks
this module against the official SDK's `validate_event`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from typing import Literal

Generation = Literal["legacy", "standard"]
GENERATIONS: tuple[Generation, ...] = ("legacy", "standard")
PREFIX = "whsec_"


def new_standard_secret() -> str:
    """A secret as Polar generates it today: `whsec_` + base64 of 32 random bytes."""
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_legacy_secret() -> str:
    """A secret of the older kind: `whsec_` + URL-safe random text, used as-is."""
    return PREFIX + secrets.token_urlsafe(32)


def new_secret(generation: Generation) -> str:
    return new_standard_secret() if generation == "standard" else new_legacy_secret()


def signing_key(secret: str, generation: Generation) -> bytes:
    """The HMAC key Polar uses for an endpoint whose secret is of this generation."""
    if generation == "legacy":
        return secret.encode()
    if not secret.startswith(PREFIX):
        raise ValueError("a standard secret starts with whsec_")
    encoded = secret[len(PREFIX) :]
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)


def polar_signature(
    secret: str, generation: Generation, webhook_id: str, timestamp: int | str, body: bytes
) -> str:
    """The base64 signature Polar computes (without the `v1,` prefix)."""
    message = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret, generation), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def polar_signature_header(
    secret: str, generation: Generation, webhook_id: str, timestamp: int | str, body: bytes
) -> str:
    """The `webhook-signature` header value Polar sends."""
    return "v1," + polar_signature(secret, generation, webhook_id, timestamp, body)


def polar_headers(
    secret: str,
    generation: Generation,
    body: bytes,
    *,
    webhook_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The headers of one Polar delivery attempt of `body` (now, fresh id by default)."""
    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": polar_signature_header(secret, generation, webhook_id, stamp, body),
        "content-type": "application/json",
    }
