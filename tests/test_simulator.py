"""The simulated Polar behaves like REFERENCE.md says real Polar does, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from worker.simulator.server import SimulatedPolar
from worker.simulator.state import SimState
from worker.simulator.webhooks import WebhookSender, sign, verify

VECTOR_SECRET = "whsec_ovyN6cPrTv56AApvzCaJno08SSmGJmgbWilb33N2JuK"
VECTOR_ID = "0f3e8f8e-5a1b-4c2d-9e7f-1a2b3c4d5e6f"
VECTOR_TS = 1767225600
VECTOR_BODY = (
    b'{"type":"customer_seat.revoked","timestamp":"2026-01-01T00:00:00Z",'
    b'"data":{"id":"9b1c0c1e-2f2a-4d8e-8a55-0c1b6f3c8e11"}}'
)
VECTOR_SIGNATURE = "v1,MixzmdTOx+QJmVdDnQ0mG73viqr8GXB8/GD33dDX80w="
SECRET = "whsec_test-secret-for-simulator"
SEATS = "/v1/customer-seats"


class FrozenClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedPolar]:
    async with SimulatedPolar(seed=1) as simulator:
        yield simulator


@pytest.fixture
async def api(sim: SimulatedPolar) -> AsyncIterator[httpx.AsyncClient]:
    async with sim.client() as client:
        yield client


@dataclass
class Receiver:
    """A tiny webhook endpoint on a loopback port that records raw deliveries."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answers to give first, then 202

    async def handle(self, request: Request) -> Response:
        self.received.append((dict(request.headers), await request.body()))
        return Response(status_code=self.statuses.pop(0) if self.statuses else 202)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = Starlette(routes=[Route("/hook", recv.handle, methods=["POST"])])
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    recv.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None))
    task = asyncio.create_task(server._serve(sockets=[sock]))
    for _ in range(1000):
        if server.started:
            break
        await asyncio.sleep(0.005)
    yield recv
    server.should_exit = True
    await task


def seat_events(state: SimState) -> list[str]:
    return [t for t in state.event_types() if t.startswith("customer_seat.")]


# ---------------------------------------------------------------------- signatures


def test_signature_reproduces_reference_test_vector() -> None:
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE


def test_signature_key_is_whole_secret_not_base64_decoded() -> None:
    # standardwebhooks base64-decodes a whsec_ secret; Polar's key is the raw string bytes.
    wrong = Webhook(VECTOR_SECRET)
    right = Webhook(base64.b64encode(VECTOR_SECRET.encode()).decode())
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    assert right.sign(VECTOR_ID, datetime.fromtimestamp(VECTOR_TS, UTC), VECTOR_BODY.decode()) == (
        VECTOR_SIGNATURE
    )
    assert wrong.sign(VECTOR_ID, datetime.fromtimestamp(VECTOR_TS, UTC), VECTOR_BODY.decode()) != (
        VECTOR_SIGNATURE
    )
    assert verify(
        VECTOR_SECRET,
        VECTOR_ID,
        VECTOR_TS,
        VECTOR_BODY,
        headers["webhook-signature"],
        now=VECTOR_TS,
    )


def test_verify_accepts_any_of_several_space_separated_signatures() -> None:
    header = f"v1,bm90LXRoZS1zaWduYXR1cmU= {VECTOR_SIGNATURE} v1a,ignored"
    assert verify(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY, header, now=VECTOR_TS)
    assert not verify(
        VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY, "v1,bm90 v1,YWJj", now=VECTOR_TS
    )
    # Outside the +-5 minute tolerance even a correct signature is refused.
    assert not verify(
        VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY, VECTOR_SIGNATURE, now=VECTOR_TS + 301
    )


# ---------------------------------------------------------------------- seat lifecycle


async def test_assign_after_revoke_reuses_the_revoked_row(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=1)
    first = (await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})).json()
    assert (await api.delete(f"{SEATS}/{first['id']}")).status_code == 200

    response = await api.post(SEATS, json={"subscription_id": sub["id"], "email": "b@x.io"})

    assert response.status_code == 200
    second = response.json()
    assert second["id"] == first["id"]
    assert second["status"] == "pending"
    assert second["email"] == "b@x.io"
    assert second["member_id"] != first["member_id"]
    assert second["revoked_at"] is None
    listed = (await api.get(SEATS, params={"subscription_id": sub["id"]})).json()
    assert [s["id"] for s in listed["seats"]] == [first["id"]]


async def test_seat_has_exactly_the_reference_keys(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = (await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})).json()
    assert set(seat) == {
        "id", "created_at", "modified_at", "subscription_id", "order_id", "status",
        "customer_id", "member_id", "member", "email", "customer_email",
        "invitation_token_expires_at", "claimed_at", "revoked_at", "seat_metadata",
    }  # fmt: skip
    assert set(seat["member"]) == {
        "id", "created_at", "modified_at", "customer_id", "email", "name", "external_id", "role"
    }  # fmt: skip
    assert seat["order_id"] is None


async def test_revoke_nulls_holder_and_is_idempotent_without_second_webhook(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=2)
    seat = (await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})).json()

    revoked = (await api.delete(f"{SEATS}/{seat['id']}")).json()

    assert revoked["status"] == "revoked"
    assert revoked["revoked_at"] is not None
    for key in ("customer_id", "member_id", "member", "email"):
        assert revoked[key] is None, key
    assert revoked["invitation_token_expires_at"] == seat["invitation_token_expires_at"]
    payload = [e.data for e in sim.state.events if e.type == "customer_seat.revoked"]
    assert payload == [revoked]

    again = await api.delete(f"{SEATS}/{seat['id']}")
    assert again.status_code == 200
    assert again.json() == revoked
    assert seat_events(sim.state).count("customer_seat.revoked") == 1


async def test_resend_keeps_token_and_expiry_and_refuses_claimed_seats(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=2)
    seat = (await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})).json()
    token = sim.state.invitation_token(seat["id"])
    sim.state.advance(3600)

    resent = await api.post(f"{SEATS}/{seat['id']}/resend")

    assert resent.status_code == 200
    assert resent.json()["invitation_token_expires_at"] == seat["invitation_token_expires_at"]
    assert sim.state.invitation_token(seat["id"]) == token
    assert sim.state.resend_count(seat["id"]) == 1
    assert "customer_seat.assigned" in seat_events(sim.state)
    assert len(seat_events(sim.state)) == 1  # resend sends no webhook

    sim.state.claim(seat["id"])
    refused = await api.post(f"{SEATS}/{seat['id']}/resend")
    assert refused.status_code == 400
    assert refused.json() == {"error": "SeatNotPending", "detail": "Seat is not in pending status"}


async def test_resend_of_pending_seat_without_token_is_invalid_invitation_token(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = (await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})).json()
    sim.state.drop_invitation_token(seat["id"])

    response = await api.post(f"{SEATS}/{seat['id']}/resend")

    assert response.status_code == 400
    assert response.json()["error"] == "InvalidInvitationToken"


async def test_expired_invitation_cannot_be_claimed_even_after_resend(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = (await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})).json()
    token = sim.state.invitation_token(seat["id"])
    sim.state.advance(25 * 3600)
    assert (await api.post(f"{SEATS}/{seat['id']}/resend")).status_code == 200

    info = await api.get(f"{SEATS}/claim/{token}")
    claim = await api.post(f"{SEATS}/claim", json={"invitation_token": token})

    assert info.status_code == 404
    assert claim.status_code == 400
    assert claim.json()["error"] == "InvalidInvitationToken"


async def test_invitee_claims_with_public_endpoint_and_token_is_single_use(
    sim: SimulatedPolar,
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = sim.state.assign(subscription_id=sub["id"], email="a@x.io")
    token = sim.state.invitation_token(seat["id"])
    assert token is not None
    assert token not in json.dumps(sim.state.list_seats(subscription_id=sub["id"]))
    async with httpx.AsyncClient(base_url=sim.base_url) as public:  # no Authorization header
        info = await public.get(f"{SEATS}/claim/{token}")
        claimed = await public.post(f"{SEATS}/claim", json={"invitation_token": token})
        replay = await public.post(f"{SEATS}/claim", json={"invitation_token": token})

    assert info.status_code == 200
    assert info.json()["customer_email"] == "a@x.io"
    assert info.json()["can_claim"] is True
    assert claimed.status_code == 200
    assert claimed.json()["seat"]["status"] == "claimed"
    assert claimed.json()["seat"]["claimed_at"] is not None
    assert replay.status_code == 400
    assert seat_events(sim.state) == ["customer_seat.assigned", "customer_seat.claimed"]


async def test_available_seats_counts_expired_pending_and_floors_at_zero(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=4)
    sim.state.assign(subscription_id=sub["id"], email="a@x.io")
    sim.state.assign(subscription_id=sub["id"], email="b@x.io", immediate_claim=True)
    c = sim.state.assign(subscription_id=sub["id"], email="c@x.io")
    sim.state.revoke(c["id"])
    sim.state.advance(48 * 3600)  # a's invitation has expired, but still holds the slot

    listed = (await api.get(SEATS, params={"subscription_id": sub["id"]})).json()
    assert (listed["total_seats"], listed["available_seats"], len(listed["seats"])) == (4, 2, 3)
    assert {s["status"] for s in listed["seats"]} == {"pending", "claimed", "revoked"}

    sim.state.set_seat_count(sub["id"], 1)
    listed = (await api.get(SEATS, params={"subscription_id": sub["id"]})).json()
    assert (listed["total_seats"], listed["available_seats"]) == (1, 0)


async def test_immediate_claim_sends_only_claimed_and_has_no_expiry(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=1)

    response = await api.post(
        SEATS, json={"subscription_id": sub["id"], "email": "a@x.io", "immediate_claim": True}
    )

    seat = response.json()
    assert seat["status"] == "claimed"
    assert seat["claimed_at"] is not None
    assert seat["invitation_token_expires_at"] is None
    assert seat_events(sim.state) == ["customer_seat.claimed"]


async def test_assign_errors_match_polar(sim: SimulatedPolar, api: httpx.AsyncClient) -> None:
    sub = sim.state.create_subscription(seats=1)
    ok = await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})
    assert ok.status_code == 200
    sim.state.set_seat_count(sub["id"], 2)

    again = await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})
    assert again.status_code == 400
    assert again.json()["error"] == "SeatAlreadyAssigned"

    await api.post(SEATS, json={"subscription_id": sub["id"], "email": "b@x.io"})
    full = await api.post(SEATS, json={"subscription_id": sub["id"], "email": "c@x.io"})
    assert full.status_code == 400
    assert full.json()["error"] == "SeatNotAvailable"

    both = await api.post(
        SEATS,
        json={"subscription_id": sub["id"], "email": "a@x.io", "member_id": ok.json()["member_id"]},
    )
    assert both.status_code == 400
    assert both.json()["error"] == "InvalidSeatAssignmentRequest"

    too_much = await api.post(
        SEATS,
        json={
            "subscription_id": sub["id"],
            "email": "d@x.io",
            "metadata": {str(i): i for i in range(11)},
        },
    )
    assert too_much.status_code == 422
    error = too_much.json()
    assert error["error"] == "RequestValidationError"
    assert error["detail"][0]["loc"] == ["body"]
    assert {"type", "loc", "msg", "input"} <= set(error["detail"][0])

    two_containers = await api.post(
        SEATS, json={"subscription_id": sub["id"], "order_id": sub["id"], "email": "d@x.io"}
    )
    assert two_containers.status_code == 422


async def test_member_email_change_rewrites_seats_with_only_member_updated(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=2)
    seat = sim.state.assign(subscription_id=sub["id"], email="old@x.io")
    before = len(sim.state.events)

    sim.state.update_member_email(seat["member_id"], "new@x.io")

    assert [e.type for e in sim.state.events[before:]] == ["member.updated"]
    listed = (await api.get(SEATS, params={"subscription_id": sub["id"]})).json()
    assert listed["seats"][0]["email"] == "new@x.io"
    assert listed["seats"][0]["member"]["email"] == "new@x.io"


async def test_cancel_revokes_every_seat_with_one_webhook_each(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=5)
    for name in ("a", "b", "c"):
        sim.state.assign(subscription_id=sub["id"], email=f"{name}@x.io")
    before = len(sim.state.events)

    sim.state.cancel_subscription(sub["id"])

    new = [e.type for e in sim.state.events[before:]]
    assert new.count("customer_seat.revoked") == 3
    assert "subscription.canceled" in new
    listed = (await api.get(SEATS, params={"subscription_id": sub["id"]})).json()
    assert [s["status"] for s in listed["seats"]] == ["revoked"] * 3
    assert listed["available_seats"] == 5


async def test_delete_member_revokes_their_seats(sim: SimulatedPolar) -> None:
    sub = sim.state.create_subscription(seats=2)
    seat = sim.state.assign(subscription_id=sub["id"], email="a@x.io")
    before = len(sim.state.events)

    sim.state.delete_member(seat["member_id"])

    assert [e.type for e in sim.state.events[before:]] == [
        "customer_seat.revoked",
        "member.deleted",
    ]


# ---------------------------------------------------------------------- listing


async def test_seat_list_needs_a_container_and_knows_non_seat_ones(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    plain = sim.state.create_subscription(seats=None)
    plain_order = sim.state.create_order(seats=None)

    neither = await api.get(SEATS)
    unknown = await api.get(
        SEATS, params={"subscription_id": "6b0f0b1e-1111-4222-8333-444455556666"}
    )
    malformed = await api.get(SEATS, params={"order_id": "not-a-uuid"})
    non_seat = await api.get(SEATS, params={"subscription_id": plain["id"]})
    non_seat_order = await api.get(SEATS, params={"order_id": plain_order["id"]})

    assert neither.status_code == 400
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "ResourceNotFound"
    assert malformed.status_code == 422
    assert malformed.json()["detail"][0]["loc"] == ["query", "order_id"]
    empty = {"seats": [], "available_seats": 0, "total_seats": 0}
    assert non_seat.json() == empty
    assert non_seat_order.json() == empty


async def test_seat_list_order_is_not_guaranteed(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=8)
    for i in range(8):
        sim.state.assign(subscription_id=sub["id"], email=f"u{i}@x.io")
    orders = set()
    for _ in range(5):
        listed = (await api.get(SEATS, params={"subscription_id": sub["id"]})).json()
        orders.add(tuple(s["id"] for s in listed["seats"]))
    assert len(orders) > 1


async def test_subscription_pages_clamp_to_100_and_sort_ascending_stably() -> None:
    clock = FrozenClock()
    async with SimulatedPolar(clock=clock) as sim, sim.client() as api:
        same_start = [sim.state.create_subscription(seats=1)["id"] for _ in range(120)]
        clock.now += timedelta(days=1)
        newest = sim.state.create_subscription(seats=2)["id"]
        sim.state.create_subscription(seats=1, started=False)

        first = (
            await api.get("/v1/subscriptions/", params={"limit": 500, "sorting": "started_at"})
        ).json()
        second = (
            await api.get(
                "/v1/subscriptions/", params={"limit": 500, "page": 2, "sorting": "started_at"}
            )
        ).json()
        default = (await api.get("/v1/subscriptions/")).json()

    assert len(first["items"]) == 100
    assert first["pagination"] == {"total_count": 121, "max_page": 2}
    walked = [s["id"] for s in first["items"] + second["items"]]
    assert walked == [*sorted(same_start), newest]
    assert len(default["items"]) == 10
    assert default["items"][0]["id"] == newest
    assert all(s["started_at"] is not None for s in first["items"] + second["items"])


async def test_orders_list_and_seat_based_shapes(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    seat_sub = sim.state.create_subscription(seats=3)
    order = sim.state.create_order(seats=2)

    subs = (await api.get("/v1/subscriptions/")).json()
    orders = (await api.get("/v1/orders/", params={"sorting": "created_at"})).json()
    one = await api.get(f"/v1/orders/{order['id']}")

    assert subs["items"][0]["seats"] == 3
    assert subs["items"][0]["pending_update"] is None
    assert subs["items"][0]["prices"][0]["amount_type"] == "seat_based"
    assert subs["items"][0]["id"] == seat_sub["id"]
    assert orders["items"][0]["seats"] == 2
    assert one.status_code == 200
    assert one.json()["id"] == order["id"]
    assert (await api.get("/v1/orders/", params={"limit": 0})).status_code == 422


# ---------------------------------------------------------------------- edges


async def test_rate_limit_is_per_organization_with_empty_429() -> None:
    async with SimulatedPolar(rate_limit=3, rate_window=7) as sim:
        sim.add_token("second_token")
        async with sim.client() as one, sim.client(token="second_token") as two:
            statuses = [
                (await one.get("/v1/orders/")).status_code,
                (await two.get("/v1/orders/")).status_code,
                (await one.get("/v1/orders/")).status_code,
            ]
            limited = await two.get("/v1/orders/")

    assert statuses == [200, 200, 200]
    assert limited.status_code == 429
    assert limited.content == b""
    assert limited.headers["retry-after"] == "7"
    assert not [h for h in limited.headers if h.lower().startswith("x-ratelimit")]
    assert sim.log.count(status=429) == 1


async def test_rate_window_resets_after_window() -> None:
    async with SimulatedPolar(rate_limit=2, rate_window=0.3) as sim, sim.client() as api:
        codes = [(await api.get("/v1/orders/")).status_code for _ in range(3)]
        await asyncio.sleep(0.35)
        after = (await api.get("/v1/orders/")).status_code
    assert codes == [200, 200, 429]
    assert after == 200
    assert sim.log.requests_per_window(0.3)[0] == 3


async def test_auth_errors_have_polar_bodies_and_write_does_not_imply_read(
    sim: SimulatedPolar,
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = sim.state.assign(subscription_id=sub["id"], email="a@x.io")
    sim.add_token("write_only", {"customer_seats:write"})
    params = {"subscription_id": sub["id"]}
    async with (
        httpx.AsyncClient(base_url=sim.base_url) as anon,
        sim.client(token="wrong") as bad,
        sim.client(token="write_only") as writer,
    ):
        missing = await anon.get(SEATS, params=params)
        unknown = await bad.get(SEATS, params=params)
        no_read = await writer.get(SEATS, params=params)
        no_discovery = await writer.get("/v1/subscriptions/")
        can_write = await writer.delete(f"{SEATS}/{seat['id']}")

    assert missing.status_code == 401
    assert missing.json() == {"error": "Unauthorized", "detail": "Unauthorized"}
    assert unknown.status_code == 401
    assert unknown.json()["error"] == "invalid_token"
    assert "error_description" in unknown.json()
    assert no_read.status_code == 403
    assert no_read.json() == {
        "error": "insufficient_scope",
        "error_description": (
            "The request requires higher privileges than provided by the access token."
        ),
    }
    assert 'scope="customer_seats:read"' in no_read.headers["www-authenticate"]
    assert no_discovery.status_code == 403
    assert "subscriptions:read" in no_discovery.headers["www-authenticate"]
    assert can_write.status_code == 200


async def test_seat_calls_answer_feature_not_enabled(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = sim.state.assign(subscription_id=sub["id"], email="a@x.io")
    sim.state.seat_feature_enabled = False

    responses = [
        await api.get(SEATS, params={"subscription_id": sub["id"]}),
        await api.post(SEATS, json={"subscription_id": sub["id"], "email": "b@x.io"}),
        await api.delete(f"{SEATS}/{seat['id']}"),
        await api.post(f"{SEATS}/{seat['id']}/resend"),
    ]

    assert [r.status_code for r in responses] == [403] * 4
    assert {r.json()["error"] for r in responses} == {"FeatureNotEnabled"}
    assert (await api.get("/v1/subscriptions/")).status_code == 200


async def test_unknown_polar_version_is_404(sim: SimulatedPolar, api: httpx.AsyncClient) -> None:
    sim.state.create_subscription(seats=1)
    unknown = await api.get("/v1/subscriptions/", headers={"Polar-Version": "2025-01"})
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "Not Found"}
    async with httpx.AsyncClient(
        base_url=sim.base_url, headers={"Authorization": f"Bearer {sim.token}"}
    ) as no_version:
        assert (await no_version.get("/v1/subscriptions/")).status_code == 200


# ---------------------------------------------------------------------- webhooks


async def test_webhooks_arrive_signed_and_redelivery_resends_same_bytes(
    receiver: Receiver,
) -> None:
    ticks = iter(range(1_767_225_600, 1_767_225_700))
    now = time.time()
    receiver.statuses = [500]
    async with SimulatedPolar(webhook_url=receiver.url, webhook_secret=SECRET) as sim:
        sim.webhooks.timestamp_clock = lambda: next(ticks) - 1_767_225_600 + now
        sub = sim.state.create_subscription(seats=1)
        async with sim.client() as api:
            await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})
        await sim.webhooks.flush()

    assert receiver.received
    for headers, body in receiver.received:
        assert headers["content-type"] == "application/json"
        assert verify(
            SECRET,
            headers["webhook-id"],
            headers["webhook-timestamp"],
            body,
            headers["webhook-signature"],
        )
        assert Webhook(base64.b64encode(SECRET.encode()).decode()).verify(body, headers)
    first_headers, first_body = receiver.received[0]
    retries = [
        (h, b) for h, b in receiver.received if h["webhook-id"] == first_headers["webhook-id"]
    ]
    assert len(retries) == 2  # 500 then success
    assert retries[1][1] == first_body
    assert retries[1][0]["webhook-timestamp"] != first_headers["webhook-timestamp"]

    types = [json.loads(b)["type"] for _, b in receiver.received]
    assert "customer_seat.assigned" in types
    envelope = json.loads(next(b for _, b in receiver.received if b"customer_seat.assigned" in b))
    assert set(envelope) == {"type", "timestamp", "data"}
    assert envelope["data"]["email"] == "a@x.io"
    assert b" " not in first_body.split(b'"data"')[0]  # compact JSON


async def test_endpoint_is_disabled_after_consecutive_failed_events(receiver: Receiver) -> None:
    state = SimState()
    sender = WebhookSender(state, url=receiver.url, secret=SECRET, max_attempts=1, disable_after=3)
    await sender.start()
    try:
        receiver.statuses = [500, 500, 500]
        state.create_order(seats=1)  # member.created, order.created, order.paid: all fail
        await sender.flush()
        assert sender.disabled
        state.create_order(seats=1)
        await sender.flush()
    finally:
        await sender.aclose()
    assert len(receiver.received) == 3
    assert len(sender.discarded) == 3  # created while disabled: never sent, no backfill


async def test_chaos_drop_and_duplicate(receiver: Receiver) -> None:
    state = SimState()
    sender = WebhookSender(state, url=receiver.url, secret=SECRET)
    await sender.start()
    try:
        sender.chaos.drop_probability = 1.0
        state.create_order(seats=1)
        await sender.flush()
        assert receiver.received == []
        assert len(sender.dropped) == 3
        sender.chaos.drop_probability = 0.0
        sender.chaos.duplicate_probability = 1.0
        state.create_order(seats=1)
        await sender.flush()
    finally:
        await sender.aclose()
    ids = [headers["webhook-id"] for headers, _ in receiver.received]
    assert len(ids) == 6
    assert len(set(ids)) == 3


# ---------------------------------------------------------------------- injection


async def test_held_seat_list_returns_snapshot_taken_before_the_hold(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = sim.state.assign(subscription_id=sub["id"], email="a@x.io")
    hold = sim.hold_list_seats(5.0, times=1)

    fetch = asyncio.create_task(api.get(SEATS, params={"subscription_id": sub["id"]}))
    await hold.wait_entered()
    sim.state.revoke(seat["id"])
    hold.release()
    stale = (await fetch).json()
    fresh = (await api.get(SEATS, params={"subscription_id": sub["id"]})).json()

    assert stale["seats"][0]["status"] == "pending"
    assert fresh["seats"][0]["status"] == "revoked"


async def test_hold_with_snapshot_after_sees_the_change(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = sim.state.assign(subscription_id=sub["id"], email="a@x.io")
    hold = sim.hold_list_seats(5.0, snapshot="after")

    fetch = asyncio.create_task(api.get(SEATS, params={"subscription_id": sub["id"]}))
    await hold.wait_entered()
    sim.state.revoke(seat["id"])
    hold.release()

    assert (await fetch).json()["seats"][0]["status"] == "revoked"


async def test_latency_delays_every_request(sim: SimulatedPolar, api: httpx.AsyncClient) -> None:
    sim.set_latency(0.2)
    started = time.perf_counter()
    await api.get("/v1/orders/")
    assert time.perf_counter() - started >= 0.2
    sim.set_latency(0.0)
    sim.set_latency(0.3, path_contains="/v1/subscriptions")
    started = time.perf_counter()
    await api.get("/v1/orders/")
    assert time.perf_counter() - started < 0.2


async def test_faults_fail_n_times_then_recover(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sim.add_fault("/v1/orders", status=503, times=2, headers={"retry-after": "1"})
    codes = [(await api.get("/v1/orders/")).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert sim.log.count(method="GET", path_prefix="/v1/orders", status=503) == 2


async def test_hang_and_drop_look_like_transport_failures(
    sim: SimulatedPolar, api: httpx.AsyncClient
) -> None:
    sim.add_fault("/v1/orders", "hang", hang_seconds=30)
    with pytest.raises(httpx.ReadTimeout):
        await api.get("/v1/orders/", timeout=0.3)
    sim.add_fault("/v1/subscriptions", "drop")
    with pytest.raises(httpx.RemoteProtocolError):
        await api.get("/v1/subscriptions/")
    assert (await api.get("/v1/subscriptions/")).status_code == 200


async def test_probabilistic_faults_are_seeded(sim: SimulatedPolar, api: httpx.AsyncClient) -> None:
    sim.add_fault("/v1/orders", status=500, times=None, probability=0.5)
    codes = [(await api.get("/v1/orders/")).status_code for _ in range(30)]
    assert 0 < codes.count(500) < 30
    assert set(codes) == {200, 500}


# ---------------------------------------------------------------------- running


async def test_simulator_restarts_cleanly_many_times() -> None:
    for _ in range(4):
        sim = SimulatedPolar()
        await sim.start()
        async with sim.client() as api:
            assert (await api.get("/v1/orders/")).status_code == 200
        await sim.stop()
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as c:
                await c.get(sim.base_url + "/v1/orders/")


async def test_control_api_drives_the_simulator(sim: SimulatedPolar) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as ctl:
        sub = (await ctl.post("/_sim/subscriptions", json={"seats": 2})).json()
        seat = (
            await ctl.post(
                "/_sim/seats/assign", json={"subscription_id": sub["id"], "email": "a@x.io"}
            )
        ).json()
        token = (await ctl.get(f"/_sim/seats/{seat['id']}/token")).json()["invitation_token"]
        claimed = (await ctl.post(f"/_sim/seats/{seat['id']}/claim")).json()
        await ctl.post("/_sim/faults", json={"path_contains": "/v1/orders", "status": 502})
        async with sim.client() as api:
            assert (await api.get("/v1/orders/")).status_code == 502
        counted = (await ctl.get("/_sim/log", params={"status": "502"})).json()
        canceled = await ctl.post(f"/_sim/subscriptions/{sub['id']}/cancel", json={})
        missing = await ctl.post("/_sim/seats/6b0f0b1e-1111-4222-8333-444455556666/revoke")

    assert token
    assert claimed["status"] == "claimed"
    assert counted["count"] == 1
    assert canceled.json()["status"] == "canceled"
    assert missing.status_code == 404
    assert sim.state.seats[seat["id"]]["status"] == "revoked"
