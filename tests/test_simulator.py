"""The simulated Polar behaves like real Polar does, over real HTTP.

Whether its bodies and signatures are what Polar's own SDK expects is checked in
`test_simulator_oracle.py`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from polar.v2026_10.webhooks import validate_event

from tests.support.polar_sdk_oracle import WebhookCapture
from tests.support.polar_signing import polar_signature_header
from worker.simulator.server import SimulatedPolar
from worker.simulator.state import SimState, SimulatorError
from worker.simulator.webhooks import WebhookSender, new_webhook_secret, sign

VECTOR_SECRET = "whsec_ovyN6cPrTv56AApvzCaJno08SSmGJmgbWilb33N2JuK"
VECTOR_ID = "0f3e8f8e-5a1b-4c2d-9e7f-1a2b3c4d5e6f"
VECTOR_TS = 1767225600
VECTOR_BODY = (
    b'{"type":"customer_seat.revoked","timestamp":"2026-01-01T00:00:00Z",'
    b'"data":{"id":"9b1c0c1e-2f2a-4d8e-8a55-0c1b6f3c8e11"}}'
)
VECTOR_SIGNATURE = "v1,MixzmdTOx+QJmVdDnQ0mG73viqr8GXB8/GD33dDX80w="
SECRET = "whsec_" + base64.b64encode(b"simulator test key, 32 bytes...!").decode()
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


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookCapture]:
    async with WebhookCapture().serving() as endpoint:
        yield endpoint


def seat_events(state: SimState) -> list[str]:
    return [t for t in state.event_types() if t.startswith("customer_seat.")]


# ---------------------------------------------------------------------- signatures


def test_legacy_signature_reproduces_polars_test_vector() -> None:
    assert sign(VECTOR_SECRET, "legacy", VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE


def test_standard_signature_uses_the_decoded_key() -> None:
    secret = new_webhook_secret("standard")
    args = (VECTOR_ID, VECTOR_TS, VECTOR_BODY)
    expected = polar_signature_header(secret, "standard", *args)
    assert sign(secret, "standard", *args) == expected
    # The same secret used the legacy way (whole string as key) gives another signature.
    assert sign(secret, "legacy", *args) == polar_signature_header(secret, "legacy", *args)
    assert sign(secret, "legacy", *args) != expected


def test_new_secrets_are_shaped_like_polars() -> None:
    standard = new_webhook_secret("standard")
    legacy = new_webhook_secret("legacy")
    assert standard.startswith("whsec_")
    assert len(base64.b64decode(standard.removeprefix("whsec_"), validate=True)) == 32
    assert legacy.startswith("whsec_")
    assert len(legacy.removeprefix("whsec_")) == 43  # 32 random bytes, URL-safe text
    assert standard != new_webhook_secret("standard")


def test_a_standard_endpoint_refuses_a_secret_that_is_not_base64_without_echoing_it() -> None:
    odd = "whsec_not-base64-at-all!"
    with pytest.raises(ValueError, match="legacy") as refused:
        WebhookSender(SimState(), secret=odd)
    assert odd not in str(refused.value)
    assert WebhookSender(SimState(), secret=odd, secret_kind="legacy").secret == odd


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


async def test_creating_a_member_sends_member_created(sim: SimulatedPolar) -> None:
    sub = sim.state.create_subscription(seats=2)
    before = len(sim.state.events)

    seat = sim.state.assign(subscription_id=sub["id"], email="new@x.io")

    created = [e for e in sim.state.events[before:] if e.type == "member.created"]
    assert [e.data["id"] for e in created] == [seat["member_id"]]
    assert created[0].data["customer_id"] == sub["customer_id"]


async def test_without_the_member_model_the_address_is_only_in_customer_email() -> None:
    async with SimulatedPolar(member_model=False) as sim, sim.client() as api:
        sub = sim.state.create_subscription(seats=3, customer_email="buyer@x.io")
        seat = (
            await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})
        ).json()
        again = await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"})
        by_member = await api.post(
            SEATS,
            json={
                "subscription_id": sub["id"],
                "member_id": "6b0f0b1e-1111-4222-8333-444455556666",
            },
        )
        resent = await api.post(f"{SEATS}/{seat['id']}/resend")
        revoked = (await api.delete(f"{SEATS}/{seat['id']}")).json()

    assert (seat["email"], seat["member_id"], seat["member"]) == (None, None, None)
    assert seat["customer_email"] == "a@x.io"
    holder = sim.state.customers[seat["customer_id"]]
    assert holder["email"] == "a@x.io"  # the holder's own customer, not the buyer
    assert seat["customer_id"] != sub["customer_id"]
    assert again.json()["error"] == "SeatAlreadyAssigned"
    assert by_member.json()["error"] == "InvalidSeatAssignmentRequest"
    assert resent.status_code == 200  # the invitation goes to customer_email
    assert revoked["customer_email"] is None
    assert not sim.state.members
    assert not [t for t in sim.state.event_types() if t.startswith("member.")]


@pytest.mark.parametrize("member_model", [True, False], ids=["member-model", "no-member-model"])
async def test_customer_email_change_rewrites_customer_email_with_only_customer_updated(
    member_model: bool,
) -> None:
    async with SimulatedPolar(member_model=member_model) as sim, sim.client() as api:
        sub = sim.state.create_subscription(seats=2, customer_email="buyer@x.io")
        seat = sim.state.assign(subscription_id=sub["id"], email="old@x.io")
        other = sim.state.create_subscription(seats=1)
        bystander = sim.state.assign(subscription_id=other["id"], email="else@x.io")
        before = len(sim.state.events)

        customer = sim.state.update_customer_email(seat["customer_id"], "new@x.io")

        new_events = sim.state.events[before:]
        listed = (await api.get(SEATS, params={"subscription_id": sub["id"]})).json()
        untouched = (await api.get(SEATS, params={"subscription_id": other["id"]})).json()
        shown = (await api.get(f"/v1/subscriptions/{sub['id']}")).json()

    assert [e.type for e in new_events] == ["customer.updated"]
    assert new_events[0].data == customer
    assert customer["email"] == "new@x.io"
    assert listed["seats"][0]["customer_email"] == "new@x.io"
    assert untouched["seats"][0] == bystander
    # With the member model the seat's customer is the buyer, and `email` stays the member's.
    expected_email = "old@x.io" if member_model else None
    assert listed["seats"][0]["email"] == expected_email
    if member_model:
        assert shown["customer"]["email"] == "new@x.io"


async def test_resend_without_any_address_is_invalid_invitation_token(sim: SimulatedPolar) -> None:
    sub = sim.state.create_subscription(seats=1)
    seat = sim.state.assign(subscription_id=sub["id"], email="a@x.io")
    sim.state.seats[seat["id"]].update(email=None, customer_email=None)

    with pytest.raises(SimulatorError, match="InvalidInvitationToken"):
        sim.state.resend(seat["id"])


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


async def test_subscription_orders_carry_the_subscription_and_the_first_one_its_seats() -> None:
    async with SimulatedPolar(subscription_orders=True) as sim, sim.client() as api:
        sub = sim.state.create_subscription(seats=3)
        sim.state.apply_pending_update(sub["id"])  # a renewal
        one_time = sim.state.create_order(seats=2)
        orders = (await api.get("/v1/orders/", params={"sorting": "created_at"})).json()["items"]
        first = orders[0]
        seats_of_first = (await api.get(SEATS, params={"order_id": first["id"]})).json()

    assert [(o["billing_reason"], o["subscription_id"], o["seats"]) for o in orders] == [
        ("subscription_create", sub["id"], 3),
        ("subscription_cycle", sub["id"], None),
        ("purchase", None, 2),
    ]
    assert first["subscription"]["id"] == sub["id"]
    assert orders[2]["id"] == one_time["id"]
    assert orders[2]["subscription"] is None
    # Polar answers with the order's own `seats` count though its seats live on the
    # subscription: a mirror must not take this order for a seat scope.
    assert seats_of_first == {"seats": [], "available_seats": 3, "total_seats": 3}


async def test_subscriptions_create_no_orders_unless_asked(sim: SimulatedPolar) -> None:
    sim.state.create_subscription(seats=3)
    assert not sim.state.orders
    sim.state.create_subscription(seats=3, with_order=True)
    assert len(sim.state.orders) == 1


async def test_orders_list_filters_by_product_billing_type() -> None:
    async with SimulatedPolar(subscription_orders=True) as sim, sim.client() as api:
        sub = sim.state.create_subscription(seats=3)
        one_time = sim.state.create_order(seats=2)

        async def listed(*types: str) -> list[str]:
            params: list[tuple[str, str | int | float | bool | None]] = [
                ("product_billing_type", t) for t in types
            ]
            response = await api.get("/v1/orders/", params=params)
            assert response.status_code == 200, response.text
            return [o["id"] for o in response.json()["items"]]

        only_one_time = await listed("one_time")
        recurring = await listed("recurring")
        both = await listed("one_time", "recurring")
        bad = await api.get("/v1/orders/", params={"product_billing_type": "monthly"})

    assert only_one_time == [one_time["id"]]
    assert [sim.state.orders[i]["subscription_id"] for i in recurring] == [sub["id"]]
    assert sorted(both) == sorted(sim.state.orders)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "product_billing_type", 0]


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
    receiver: WebhookCapture,
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
        validate_event(body, headers, SECRET)  # Polar's own SDK
        assert headers["webhook-signature"] == polar_signature_header(
            SECRET, "standard", headers["webhook-id"], headers["webhook-timestamp"], body
        )
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
    assert list(envelope) == ["type", "timestamp", "data", "api_version"]
    assert envelope["api_version"] == "2026-10"
    assert envelope["data"]["email"] == "a@x.io"
    assert b" " not in first_body.split(b'"data"')[0]  # compact JSON


async def test_endpoint_is_disabled_after_consecutive_failed_events(
    receiver: WebhookCapture,
) -> None:
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


async def test_chaos_drop_and_duplicate(receiver: WebhookCapture) -> None:
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
        legacy = new_webhook_secret("legacy")
        configured = await ctl.post(
            "/_sim/webhooks/config", json={"secret": legacy, "kind": "legacy"}
        )
        status = await ctl.get("/_sim/webhooks")
        not_base64 = await ctl.post(
            "/_sim/webhooks/config", json={"secret": "whsec_x-y!", "kind": "standard"}
        )
        renamed = await ctl.post(
            f"/_sim/customers/{sub['customer_id']}/email", json={"email": "new@x.io"}
        )

    assert token
    assert claimed["status"] == "claimed"
    assert counted["count"] == 1
    assert canceled.json()["status"] == "canceled"
    assert missing.status_code == 404
    assert sim.state.seats[seat["id"]]["status"] == "revoked"
    # The secret a caller sets is never echoed back; its kind is.
    for answer in (configured, status, not_base64):
        assert legacy not in answer.text and "whsec_x-y!" not in answer.text
    assert configured.json()["secret_kind"] == "legacy"
    assert status.json()["secret_kind"] == "legacy"
    assert not_base64.status_code == 400
    assert (sim.webhooks.secret, sim.webhooks.secret_kind) == (legacy, "legacy")
    assert renamed.json()["email"] == "new@x.io"
    assert sim.state.event_types()[-1] == "customer.updated"
