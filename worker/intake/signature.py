"""Is this request from Polar? Polar signs each webhook as Standard Webhooks does: an
HMAC-SHA256 of `webhook-id.webhook-timestamp.body`, sent as `webhook-signature: v1,<base64>`."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence

# A signature older or newer than this is refused: a replay window of five minutes.
TOLERANCE_SECONDS = 300


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
