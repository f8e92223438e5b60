"""The receiver's signature verdict against Polar's own: the official SDK (`polar-sdk`).

`polar.v2026_10.webhooks.validate_event` is Polar's verifier. It raises
`PolarWebhookVerificationError` when the signature does not hold; anything after that
(an unknown type, a body that is not a full payload) means the signature was accepted.
The receiver answers 403 exactly when its verdict is "not from Polar". Both must agree, for
secrets of both generations, on whatever Polar or an attacker could send.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from unittest import mock

import polar.webhooks
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from polar.v2026_10.webhooks import (
    PolarWebhookError,
    PolarWebhookVerificationError,
    WebhookCustomerSeatRevokedPayload,
    validate_event,
)

from tests.support.mirror import delivery_ids
from tests.support.polar_signing import (
    GENERATIONS,
    Generation,
    polar_headers,
    polar_signature,
    polar_signature_header,
    signing_key,
)
from tests.support.settings import make_settings
from tests.support.webhooks import (
    LEGACY_VECTOR,
    STANDARD_VECTOR,
    receiver_client,
)
from worker.intake.receiver import WEBHOOK_PATH

EXAMPLES = 100
TOLERANCE = 300
DAY = 86400


@contextlib.contextmanager
def sdk_clock(now: float | None) -> Iterator[None]:
    """The SDK's verifier with its clock at `now` (only in the SDK's module)."""
    if now is None:
        yield
        return
    with mock.patch.object(polar.webhooks, "time", SimpleNamespace(time=lambda: now)):
        yield


def sdk_accepts_signature(
    body: bytes, headers: dict[str, str], secret: str, *, now: float | None = None
) -> bool:
    with sdk_clock(now):
        try:
            validate_event(body, headers, secret)
        except PolarWebhookVerificationError:
            return False
        except PolarWebhookError:  # verified, but an unknown type or not a full payload
            return True
    return True


# ---------------------------------------------------------------------- the vectors


def test_polars_legacy_vector_passes_the_sdk() -> None:
    now = LEGACY_VECTOR.sent_at + 10
    headers = LEGACY_VECTOR.headers()
    assert sdk_accepts_signature(LEGACY_VECTOR.body, headers, LEGACY_VECTOR.secret, now=now)
    assert not sdk_accepts_signature(LEGACY_VECTOR.body, headers, STANDARD_VECTOR.secret, now=now)


def test_the_standard_vector_passes_the_sdk_and_loads() -> None:
    headers = STANDARD_VECTOR.headers()
    with sdk_clock(STANDARD_VECTOR.sent_at + 10):
        payload = validate_event(STANDARD_VECTOR.body, headers, STANDARD_VECTOR.secret)
        assert isinstance(payload, WebhookCustomerSeatRevokedPayload)
        assert payload.data.status == "revoked"
        with pytest.raises(PolarWebhookVerificationError):
            validate_event(STANDARD_VECTOR.body, headers, LEGACY_VECTOR.secret)


# ---------------------------------------------------------------------- the test helper


# Secrets as Polar generates them, drawn by hypothesis so that a failure replays exactly.
standard_secrets = st.binary(min_size=32, max_size=32).map(
    lambda key: "whsec_" + base64.b64encode(key).decode()
)
legacy_secrets = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
    min_size=43,
    max_size=43,
).map(lambda text: "whsec_" + text)
SECRETS = {"legacy": legacy_secrets, "standard": standard_secrets}

webhook_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
    min_size=1,
    max_size=64,
)
event_types = st.sampled_from(
    ["customer_seat.assigned", "subscription.updated", "checkout.updated", "seat_sync.unknown"]
)
bodies = st.builds(
    lambda event_type, data: json.dumps(
        {
            "type": event_type,
            "timestamp": "2026-11-30T00:00:00Z",
            "api_version": "2026-10",
            "data": data,
        },
        ensure_ascii=False,
    ).encode(),
    event_types,
    st.dictionaries(st.text(max_size=8), st.text(max_size=20) | st.integers(), max_size=3),
)


@hyp_settings(max_examples=EXAMPLES, deadline=None)
@given(
    generation=st.sampled_from(GENERATIONS),
    webhook_id=webhook_ids,
    body=bodies,
    other_generation=st.sampled_from(GENERATIONS),
    data=st.data(),
)
def test_the_signing_helper_signs_as_the_sdk_verifies(
    generation: Generation,
    webhook_id: str,
    body: bytes,
    other_generation: Generation,
    data: st.DataObject,
) -> None:
    secret = data.draw(SECRETS[generation])
    headers = polar_headers(secret, generation, body, webhook_id=webhook_id)
    assert sdk_accepts_signature(body, headers, secret)
    # The SDK tries exactly two keys (the whole secret's bytes, the decoded remainder), so
    # a standard signature it accepts that is not the legacy one used the decoded key.
    legacy = polar_signature(secret, "legacy", webhook_id, headers["webhook-timestamp"], body)
    assert (headers["webhook-signature"] == "v1," + legacy) == (generation == "legacy")
    # ... and a signature with another endpoint's secret of either kind is refused.
    other = data.draw(SECRETS[other_generation].filter(lambda drawn: drawn != secret))
    assert not sdk_accepts_signature(body, polar_headers(other, other_generation, body), secret)


# ---------------------------------------------------------------------- receiver vs SDK


def non_canonical(header: str) -> str:
    """The same digest, with the unused low bits of the last base64 character set."""
    version, _, value = header.partition(",")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = value.rstrip("=")
    index = alphabet.index(last[-1]) | 0b11
    return f"{version},{last[:-1]}{alphabet[index]}{value[len(last) :]}"


@st.composite
def deliveries(
    draw: st.DrawFn, secret: str, generation: Generation
) -> tuple[bytes, dict[str, str]]:
    """A request as Polar would sign it for this endpoint, then possibly re-signed,
    tampered, aged, or signed with the wrong key, as a replay or a forgery would be."""
    body = draw(bodies)
    webhook_id = draw(webhook_ids)
    offset = draw(
        st.integers(-TOLERANCE, TOLERANCE)
        | st.sampled_from([-TOLERANCE - 1, -TOLERANCE, TOLERANCE, TOLERANCE + 1])
        | st.integers(TOLERANCE + 1, 3 * DAY)
        | st.integers(-3 * DAY, -TOLERANCE - 1)
    )
    stamp = int(time.time()) + offset

    # What was signed: the sent message, or one that differs in one part (a replay of
    # another delivery's signature, or a tampered request).
    signed_body, signed_id, signed_stamp = body, webhook_id, stamp
    tamper = draw(st.sampled_from([None, None, None, "body", "id", "timestamp"]))
    if tamper == "body":
        signed_body = body + draw(st.sampled_from([b" ", b"\n", b"{}"]))
    elif tamper == "id":
        signed_id = webhook_id + draw(st.sampled_from(["x", "0", "_"]))
    elif tamper == "timestamp":
        signed_stamp = stamp + draw(st.sampled_from([-1, 1, 60]))

    def signature_with(key_secret: str, key_generation: Generation) -> str:
        return polar_signature_header(
            key_secret, key_generation, signed_id, signed_stamp, signed_body
        )

    other_generation: Generation = "legacy" if generation == "standard" else "standard"
    try:
        signing_key(secret, other_generation)
        kinds = [generation, other_generation]
    except ValueError:  # a legacy secret that is not base64 has no standard key
        kinds = [generation]
    good = signature_with(secret, draw(st.sampled_from(kinds)))
    variants = {
        "good": good,
        "wrong_legacy_key": signature_with(draw(legacy_secrets), "legacy"),
        "wrong_standard_key": signature_with(draw(standard_secrets), "standard"),
        "v2": good.replace("v1,", "v2,"),
        "no_comma": good.replace("v1,", "v1"),
        "unpadded": good.rstrip("="),
        "non_canonical": non_canonical(good),
        "truncated": good[:-5] + "=",
        "empty": "v1,",
        "garbage": "v1," + draw(st.text(alphabet="AZaz09+/=", max_size=48)),
        "short": "v1," + base64.b64encode(draw(st.binary(max_size=31))).decode(),
    }
    names = draw(st.lists(st.sampled_from(sorted(set(variants) - {"good"})), max_size=3))
    if draw(st.booleans()) or not names:  # as Polar sends it, or a forgery without it
        names.insert(draw(st.integers(0, len(names))), "good")
    separator = draw(st.sampled_from([" ", "  "]))
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": separator.join(variants[name] for name in names),
        "content-type": "application/json",
    }
    return body, headers


@pytest.mark.parametrize(
    ("generation", "secret"),
    [
        ("legacy", "whsec_legacy-kind_" + "k" * 25),  # not base64: one key
        ("legacy", LEGACY_VECTOR.secret),  # base64-shaped too: both checkers try two keys
        ("standard", STANDARD_VECTOR.secret),
    ],
    ids=["legacy", "legacy_base64_shaped", "standard"],
)
async def test_the_receiver_agrees_with_the_sdk_on_every_signature(
    database_url: str, generation: Generation, secret: str
) -> None:
    accepted_ids: set[str] = set()
    verdicts: dict[bool, int] = {}

    settings = make_settings(database_url, polar_webhook_secret=secret)
    async with receiver_client(settings) as client:
        loop = asyncio.get_running_loop()

        async def post(body: bytes, headers: dict[str, str]) -> int:
            response = await client.post(WEBHOOK_PATH, content=body, headers=headers)
            return response.status_code

        # hypothesis runs examples synchronously: drive them from a thread, each request
        # on the test's event loop, where the app's engine lives.
        @hyp_settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(request=deliveries(secret, generation))
        def one(request: tuple[bytes, dict[str, str]]) -> None:
            body, headers = request
            before = time.time()
            status = asyncio.run_coroutine_threadsafe(post(body, headers), loop).result(30)
            after = time.time()
            # The receiver judged at some instant in between: when the SDK's verdict is
            # the same at both ends, it is the verdict for that instant too.
            expected = sdk_accepts_signature(body, headers, secret, now=before)
            if expected != sdk_accepts_signature(body, headers, secret, now=after):
                return  # the ±5 minute edge passed during the request
            # 400 comes after verification (a body PostgreSQL cannot store, with NULs).
            assert status in (200, 202, 400, 403), status
            assert (status != 403) == expected, (status, headers)
            verdicts[expected] = verdicts.get(expected, 0) + 1
            if status in (200, 202):
                accepted_ids.add(headers["webhook-id"])

        await asyncio.to_thread(one)

    # A refused request leaves nothing behind; every accepted one is in the inbox.
    assert set(await delivery_ids(database_url)) == accepted_ids
    assert verdicts.get(True) and verdicts.get(False), verdicts
