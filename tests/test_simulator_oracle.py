"""The simulated Polar serves and signs what Polar's own SDK expects, for each API version.

Polar's SDK (`polar-sdk`) is the independent oracle: every seat, subscription and order body
the simulator serves loads with `polar.deserialize` into the type Polar documents, every
webhook it sends loads into the SDK's payload union and passes the SDK's `validate_event`
with the endpoint's secret, for both secret generations.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from polar.v2026_10.client import PolarAsync
from polar.v2026_10.errors import (
    CustomerSeatsAssignSeat400Error,
    CustomerSeatsListSeats404Error,
    CustomerSeatsResendInvitation400Error,
)

from tests.support.polar_sdk_oracle import (
    SDK_VERSIONS,
    WebhookCapture,
    known_event_types,
    load,
    load_webhook,
    webhooks_module,
)
from tests.support.polar_signing import polar_signature_header
from worker.simulator.server import SimulatedPolar
from worker.simulator.webhooks import SecretKind, new_webhook_secret

SEATS = "/v1/customer-seats"
KINDS: tuple[SecretKind, ...] = ("standard", "legacy")

# Every event type a seat mirror reacts to, which the scenario below must produce.
SEAT_RELEVANT_EVENTS = {
    "customer_seat.assigned",
    "customer_seat.claimed",
    "customer_seat.revoked",
    "subscription.created",
    "subscription.active",
    "subscription.updated",
    "subscription.canceled",
    "subscription.uncanceled",
    "subscription.revoked",
    "subscription.past_due",
    "subscription.paused",
    "subscription.resumed",
    "subscription.cycled",
    "order.created",
    "order.paid",
    "order.updated",
    "order.refunded",
    "customer.updated",
}
MEMBER_EVENTS = {"member.created", "member.updated", "member.deleted"}


@pytest.fixture(params=SDK_VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------------- API bodies


@pytest.mark.parametrize("member_model", [True, False], ids=["member-model", "no-member-model"])
async def test_every_seat_response_loads_as_the_sdk_types(version: str, member_model: bool) -> None:
    async with (
        SimulatedPolar(
            api_version=version, member_model=member_model, subscription_orders=True, seed=3
        ) as sim,
        sim.client() as api,  # sends the simulator's version as `Polar-Version`
    ):
        sub = sim.state.create_subscription(seats=3, customer_email="buyer@acme.example")
        order = sim.state.create_order(seats=2)
        plain_sub = sim.state.create_subscription(seats=None)
        plain_order = sim.state.create_order(seats=None)
        first_order = next(o for o in sim.state.orders.values() if o["subscription_id"])

        invited = ok(await api.post(SEATS, json={"subscription_id": sub["id"], "email": "a@x.io"}))
        immediate = ok(
            await api.post(
                SEATS,
                json={"subscription_id": sub["id"], "email": "b@x.io", "immediate_claim": True},
            )
        )
        on_order = ok(
            await api.post(
                SEATS, json={"order_id": order["id"], "email": "c@x.io", "metadata": {"k": "v"}}
            )
        )
        resent = ok(await api.post(f"{SEATS}/{invited['id']}/resend"))
        revoked = ok(await api.delete(f"{SEATS}/{immediate['id']}"))
        revoked_again = ok(await api.delete(f"{SEATS}/{immediate['id']}"))
        token = sim.state.invitation_token(on_order["id"])
        claim_info = ok(await api.get(f"{SEATS}/claim/{token}"))
        claimed = ok(await api.post(f"{SEATS}/claim", json={"invitation_token": token}))
        lists = [
            ok(await api.get(SEATS, params=params))
            for params in (
                {"subscription_id": sub["id"]},
                {"order_id": order["id"]},
                {"subscription_id": plain_sub["id"]},
                {"order_id": plain_order["id"]},
                {"order_id": first_order["id"]},
            )
        ]

    for seat in (invited, immediate, on_order, resent, revoked, revoked_again):
        load(seat, version, "CustomerSeat")
    load(claim_info, version, "SeatClaimInfo")
    load(claimed, version, "CustomerSeatClaimResponse")
    for listed in lists:
        load(listed, version, "SeatsList")
    assert [len(listed["seats"]) for listed in lists] == [2, 1, 0, 0, 0]
    if member_model:
        assert invited["email"] == "a@x.io"
        assert invited["member"]["email"] == "a@x.io"
    else:
        # Without the member model the holder is a customer: the address is customer_email.
        assert invited["email"] is None
        assert invited["member_id"] is None
        assert invited["member"] is None
        assert invited["customer_email"] == "a@x.io"
        assert sim.state.customers[invited["customer_id"]]["email"] == "a@x.io"
        assert claim_info["customer_email"] == "c@x.io"


async def test_subscription_and_order_bodies_load_as_the_sdk_types(version: str) -> None:
    async with (
        SimulatedPolar(api_version=version, subscription_orders=True, seed=4) as sim,
        sim.client() as api,  # sends the simulator's version as `Polar-Version`
    ):
        state = sim.state
        subs = {
            "active": state.create_subscription(seats=3),
            "plain": state.create_subscription(seats=None),
            "trialing": state.create_subscription(seats=2, status="trialing"),
            "scheduled": state.create_subscription(seats=2),
            "cycled": state.create_subscription(seats=2),
            "canceling": state.create_subscription(seats=1),
            "canceled": state.create_subscription(seats=1),
            "paused": state.create_subscription(seats=1),
            "past_due": state.create_subscription(seats=1),
        }
        state.set_seat_count(subs["scheduled"]["id"], 5, scheduled=True)
        state.set_seat_count(subs["cycled"]["id"], 4, scheduled=True)
        state.apply_pending_update(subs["cycled"]["id"])
        state.cancel_subscription(subs["canceling"]["id"], immediately=False)
        state.cancel_subscription(subs["canceled"]["id"])
        state.pause_subscription(subs["paused"]["id"])
        state.mark_past_due(subs["past_due"]["id"])
        state.create_order(seats=2)
        state.create_order(seats=None)
        state.create_order(seats=1, status="pending")
        state.refund_order(state.create_order(seats=3)["id"])

        sub_list = ok(await api.get("/v1/subscriptions/", params={"limit": 100}))
        order_list = ok(await api.get("/v1/orders/", params={"limit": 100}))
        one_sub = ok(await api.get(f"/v1/subscriptions/{subs['scheduled']['id']}"))
        one_order = ok(await api.get(f"/v1/orders/{order_list['items'][0]['id']}"))

    load(sub_list, version, "ListResourceSubscription")
    load(order_list, version, "ListResourceOrder")
    for item in sub_list["items"]:
        load(item, version, "Subscription")
    for item in order_list["items"]:
        load(item, version, "Order")
    load(one_sub, version, "Subscription")
    load(one_order, version, "Order")
    assert len(sub_list["items"]) == len(subs)
    assert one_sub["pending_update"]["seats"] == 5
    reasons = sorted(o["billing_reason"] for o in order_list["items"])
    assert reasons.count("subscription_create") == len(subs)
    assert reasons.count("subscription_cycle") == 1
    assert reasons.count("purchase") == 4


async def test_the_sdk_client_itself_works_against_the_simulator() -> None:
    async with SimulatedPolar(subscription_orders=True, seed=5) as sim:
        sub = sim.state.create_subscription(seats=2)
        one_time = sim.state.create_order(seats=2)
        async with PolarAsync(sim.token, base_url=sim.base_url) as client:
            seat = await client.customer_seats.assign_seat(
                subscription_id=sub["id"], email="a@x.io"
            )
            listed = await client.customer_seats.list_seats(subscription_id=sub["id"])
            resent = await client.customer_seats.resend_invitation(seat.id)
            subs = await client.subscriptions.list(limit=100)
            only_one_time = await client.orders.list(product_billing_type="one_time", limit=100)
            recurring = await client.orders.list(product_billing_type="recurring", limit=100)
            with pytest.raises(CustomerSeatsAssignSeat400Error) as taken:
                await client.customer_seats.assign_seat(subscription_id=sub["id"], email="a@x.io")
            with pytest.raises(CustomerSeatsListSeats404Error) as missing:
                await client.customer_seats.list_seats(
                    subscription_id="6b0f0b1e-1111-4222-8333-444455556666"
                )
            revoked = await client.customer_seats.revoke_seat(seat.id)
            with pytest.raises(CustomerSeatsResendInvitation400Error) as not_pending:
                await client.customer_seats.resend_invitation(seat.id)

    assert [s.id for s in listed.seats] == [seat.id]
    assert resent.invitation_token_expires_at == seat.invitation_token_expires_at
    assert [s.id for s in subs.items] == [sub["id"]]
    assert [o.id for o in only_one_time.items] == [one_time["id"]]
    assert [o.subscription_id for o in recurring.items] == [sub["id"]]
    assert revoked.status == "revoked"
    # The SDK documents these errors by status only (no body schema to load).
    assert (taken.value.status_code, missing.value.status_code) == (400, 404)
    assert not_pending.value.status_code == 400


# ---------------------------------------------------------------------- versions


async def test_an_unknown_polar_version_is_a_bare_404() -> None:
    async with SimulatedPolar() as sim, sim.client() as api:
        sub = sim.state.create_subscription(seats=1)
        unknown = [
            await api.get(
                SEATS, params={"subscription_id": sub["id"]}, headers={"Polar-Version": v}
            )
            for v in ("2025-01", "2026-07", "latest")
        ]
        served = [
            await api.get(
                SEATS, params={"subscription_id": sub["id"]}, headers={"Polar-Version": v}
            )
            for v in SDK_VERSIONS
        ]
        no_route = await api.get("/v1/customer-seats-typo")
        gone = await api.get(
            SEATS, params={"subscription_id": "6b0f0b1e-1111-4222-8333-444455556666"}
        )
        async with httpx.AsyncClient(
            base_url=sim.base_url, headers={"Authorization": f"Bearer {sim.token}"}
        ) as no_version:
            default = await no_version.get(SEATS, params={"subscription_id": sub["id"]})

    for response in (*unknown, no_route):
        assert response.status_code == 404
        assert response.json() == {"detail": "Not Found"}  # no `error` key: not "gone"
    assert [r.status_code for r in served] == [200] * len(SDK_VERSIONS)
    assert gone.status_code == 404
    assert gone.json()["error"] == "ResourceNotFound"
    assert default.status_code == 200  # Polar serves its default version


# ---------------------------------------------------------------------- webhooks


def run_every_seat_relevant_event(sim: SimulatedPolar) -> None:
    """One organisation's life that sends every event type a seat mirror reacts to."""
    state = sim.state
    sub = state.create_subscription(seats=4, customer_email="buyer@acme.example")
    invited = state.assign(subscription_id=sub["id"], email="a@x.io")
    state.claim(invited["id"])
    leaving = state.assign(subscription_id=sub["id"], email="b@x.io", immediate_claim=True)
    state.revoke(leaving["id"])
    staying = state.assign(subscription_id=sub["id"], email="c@x.io")
    if state.member_model_enabled:
        state.update_member_email(staying["member_id"], "c2@x.io")
        state.delete_member(staying["member_id"])
    state.update_customer_email(staying["customer_id"], "c3@x.io")
    state.update_customer_email(sub["customer_id"], "billing@acme.example")
    state.set_seat_count(sub["id"], 5, scheduled=True)
    state.apply_pending_update(sub["id"])
    state.cancel_subscription(sub["id"], immediately=False)
    state.uncancel_subscription(sub["id"])
    state.pause_subscription(sub["id"])
    state.resume_subscription(sub["id"])
    state.mark_past_due(sub["id"])
    state.revoke_subscription(sub["id"])
    order = state.create_order(seats=2)
    state.assign(order_id=order["id"], email="d@x.io")
    state.refund_order(order["id"])


@pytest.fixture
async def capture() -> AsyncIterator[WebhookCapture]:
    async with WebhookCapture().serving() as endpoint:
        yield endpoint


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("member_model", [True, False], ids=["member-model", "no-member-model"])
async def test_every_webhook_validates_and_loads_with_the_sdk(
    capture: WebhookCapture, version: str, kind: SecretKind, member_model: bool
) -> None:
    secret = new_webhook_secret(kind)
    async with SimulatedPolar(
        webhook_url=capture.url,
        webhook_secret=secret,
        webhook_secret_kind=kind,
        api_version=version,
        member_model=member_model,
        subscription_orders=True,
        seed=6,
    ) as sim:
        run_every_seat_relevant_event(sim)
        await sim.webhooks.flush()
        sent = sim.state.event_types()

    sdk = webhooks_module(version)
    delivered = []
    for headers, body in capture.received:
        payload = sdk.validate_event(body, headers, secret)
        envelope = json.loads(body)
        assert payload.type == envelope["type"]
        assert envelope["api_version"] == version
        assert list(envelope) == ["type", "timestamp", "data", "api_version"]
        load_webhook(body, version)
        delivered.append(envelope["type"])
    assert delivered == sent
    expected = SEAT_RELEVANT_EVENTS | (MEMBER_EVENTS if member_model else set())
    assert expected <= set(delivered)
    assert set(delivered) <= known_event_types(version)
    if not member_model:
        assert not MEMBER_EVENTS & set(delivered)
        seat_bodies = [json.loads(b)["data"] for _, b in capture.received if b"customer_seat." in b]
        assert all(seat["email"] is None and seat["member"] is None for seat in seat_bodies)


@pytest.mark.parametrize("kind", KINDS)
async def test_each_secret_generation_is_signed_with_its_own_key(
    capture: WebhookCapture, kind: SecretKind
) -> None:
    # The SDK's validate_event accepts either key, so the key itself is checked against
    # Polar's rule: a standard secret is used base64-decoded, a legacy secret's key is the
    # whole string's bytes.
    secret = new_webhook_secret(kind)
    async with SimulatedPolar(
        webhook_url=capture.url, webhook_secret=secret, webhook_secret_kind=kind
    ) as sim:
        sim.state.create_order(seats=1)
        await sim.webhooks.flush()

    other: SecretKind = "legacy" if kind == "standard" else "standard"
    assert capture.received
    for headers, body in capture.received:
        attempt = (headers["webhook-id"], headers["webhook-timestamp"], body)
        assert headers["webhook-signature"] == polar_signature_header(secret, kind, *attempt)
        try:
            assert headers["webhook-signature"] != polar_signature_header(secret, other, *attempt)
        except ValueError:  # a legacy secret need not be base64 at all
            assert kind == "legacy"
