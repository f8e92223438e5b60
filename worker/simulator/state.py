"""In-memory Polar organization state: seats, subscriptions, orders, members, and webhook events.

Pure and synchronous (no I/O), so the HTTP layer, tests and benchmarks drive exactly the
same rules. Behaviour follows Polar's server code; where its prose docs and its code
disagree, the code wins here too. Bodies carry every key Polar's own SDK requires for the
type (`CustomerSeat`, `Subscription`, `Order`, `Member`, `Customer`).
"""

from __future__ import annotations

import copy
import json
import math
import random
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

JSON = dict[str, Any]
SeatStatus = Literal["pending", "claimed", "revoked"]
MemberRole = Literal["owner", "billing_manager", "member"]
BillingReason = Literal["purchase", "subscription_create", "subscription_cycle"]
PRODUCT_BILLING_TYPES = frozenset({"one_time", "recurring"})
# The subscription keys an order embeds as `subscription` (Polar's `OrderSubscription`).
ORDER_SUBSCRIPTION_KEYS = (
    "metadata",
    "created_at",
    "modified_at",
    "id",
    "amount",
    "currency",
    "recurring_interval",
    "recurring_interval_count",
    "status",
    "current_period_start",
    "current_period_end",
    "current_meter_period_start",
    "current_meter_period_end",
    "trial_start",
    "trial_end",
    "cancel_at_period_end",
    "canceled_at",
    "started_at",
    "ends_at",
    "ended_at",
    "past_due_at",
    "pause_at_period_end",
    "paused_at",
    "resumes_at",
    "customer_id",
    "product_id",
    "discount_id",
    "checkout_id",
    "seats",
    "units",
    "customer_cancellation_reason",
    "customer_cancellation_comment",
)

INVITATION_TTL = timedelta(hours=24)
METADATA_MAX_KEYS = 10
METADATA_MAX_BYTES = 1024
LIST_LIMIT_DEFAULT = 10
LIST_LIMIT_MAX = 100

SUBSCRIPTION_SORT_FIELDS = frozenset(
    {
        "customer",
        "status",
        "started_at",
        "current_period_end",
        "ended_at",
        "ends_at",
        "amount",
        "product",
        "discount",
    }
)
ORDER_SORT_FIELDS = frozenset(
    {
        "created_at",
        "status",
        "invoice_number",
        "amount",
        "net_amount",
        "customer",
        "product",
        "discount",
        "subscription",
    }
)


class SimulatorError(Exception):
    """A Polar API error: HTTP status, Polar's exception class name, and its message."""

    def __init__(self, status_code: int, error: str, detail: str) -> None:
        super().__init__(f"{status_code} {error}: {detail}")
        self.status_code = status_code
        self.error = error
        self.detail = detail

    def body(self) -> JSON:
        return {"error": self.error, "detail": self.detail}


class SimulatorValidationError(SimulatorError):
    """A request-validation failure, answered as 422 `RequestValidationError`."""

    def __init__(self, errors: list[JSON]) -> None:
        super().__init__(422, "RequestValidationError", "validation error")
        self.errors = errors

    def body(self) -> JSON:
        return {"error": self.error, "detail": self.errors}


@dataclass(frozen=True)
class Event:
    """One webhook-worthy happening: Polar's event type and a snapshot of the object."""

    type: str
    data: JSON
    timestamp: datetime


def iso(value: datetime | None) -> str | None:
    """Serialize a datetime the way Polar (pydantic v2) does: ISO-8601 with `Z` for UTC."""
    if value is None:
        return None
    text = value.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def parse_iso(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _metadata_errors(metadata: JSON | None) -> list[JSON]:
    if metadata is None:
        return []
    if len(metadata) > METADATA_MAX_KEYS:
        message = "Metadata cannot have more than 10 keys"
    elif len(json.dumps(metadata)) > METADATA_MAX_BYTES:
        message = "Metadata size cannot exceed 1KB"
    else:
        return []
    return [
        {
            "type": "value_error",
            "loc": ["body", "metadata"],
            "msg": f"Value error, {message}",
            "input": metadata,
            "ctx": {"error": message},
        }
    ]


@dataclass
class _Container:
    """What a seat list needs about a subscription or an order (the JSON is kept beside it)."""

    kind: Literal["subscription", "order"]
    id: str
    customer_id: str
    seat_ids: list[str] = field(default_factory=list)


class SimState:
    """One simulated Polar organization.

    Every mutation appends an `Event` to `outbox` (drained by the webhook sender) and to
    `events` (kept for assertions). `listeners` are called after each new event so a
    sender can deliver in the background.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = None,
        id_factory: Callable[[], str] | None = None,
        seed: int = 0,
        member_model_enabled: bool = True,
        subscription_orders: bool = False,
        seat_feature_enabled: bool = True,
        organization_name: str = "Simulated Org",
        organization_slug: str = "simulated-org",
    ) -> None:
        self._clock = clock or _utc_now
        self._offset = timedelta()
        self.rng = random.Random(seed)
        self._new_id = id_factory or (lambda: str(uuid.uuid4()))
        # Member model on: seats hold a member (`email`, `member`); off: the holder is a
        # customer of their own and the address is only in the seat's `customer_email`.
        self.member_model_enabled = member_model_enabled
        # Polar creates an order for a subscription's first payment (`seats` set) and each
        # renewal; off by default so tests that count orders see only one-time ones.
        self.subscription_orders = subscription_orders
        self.seat_feature_enabled = seat_feature_enabled
        self.organization: JSON = {
            "id": self._new_id(),
            "name": organization_name,
            "slug": organization_slug,
        }
        self.customers: dict[str, JSON] = {}
        self.members: dict[str, JSON] = {}
        self.products: dict[str, JSON] = {}
        self.subscriptions: dict[str, JSON] = {}
        self.orders: dict[str, JSON] = {}
        self.seats: dict[str, JSON] = {}
        self._containers: dict[str, _Container] = {}
        self._tokens: dict[str, str] = {}  # seat id -> invitation token (never exposed)
        self._resends: dict[str, int] = {}
        self._product_by_kind: dict[str, str] = {}
        self.outbox: list[Event] = []
        self.events: list[Event] = []
        self.listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ time and events

    def now(self) -> datetime:
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move simulated time forward (expires invitations without waiting)."""
        self._offset += timedelta(seconds=seconds)

    def _emit(self, type_: str, data: JSON) -> None:
        event = Event(type=type_, data=copy.deepcopy(data), timestamp=self.now())
        self.outbox.append(event)
        self.events.append(event)
        for listener in list(self.listeners):
            listener()

    def drain_outbox(self) -> list[Event]:
        events, self.outbox = self.outbox, []
        return events

    def event_types(self) -> list[str]:
        return [event.type for event in self.events]

    # ------------------------------------------------------------------ catalogue

    def _product(self, *, recurring: bool, seat_based: bool) -> JSON:
        kind = f"{'recurring' if recurring else 'one_time'}-{'seat' if seat_based else 'fixed'}"
        if kind in self._product_by_kind:
            return self.products[self._product_by_kind[kind]]
        now = iso(self.now())
        product_id = self._new_id()
        price: JSON = {
            "created_at": now,
            "modified_at": None,
            "id": self._new_id(),
            "source": "catalog",
            "amount_type": "seat_based" if seat_based else "fixed",
            "price_currency": "usd",
            "tax_behavior": None,
            "is_archived": False,
            "product_id": product_id,
        }
        if seat_based:
            price["seat_tiers"] = {
                "seat_tier_type": "volume",
                "tiers": [{"min_seats": 1, "max_seats": None, "price_per_seat": 1000}],
                "minimum_seats": 1,
                "maximum_seats": None,
            }
        else:
            price["price_amount"] = 2000
        names = {
            "recurring-seat": "Team Plan",
            "recurring-fixed": "Solo Plan",
            "one_time-seat": "Team Pass",
            "one_time-fixed": "E-book",
        }
        product: JSON = {
            "id": product_id,
            "created_at": now,
            "modified_at": None,
            "trial_interval": None,
            "trial_interval_count": None,
            "name": names[kind],
            "description": None,
            "visibility": "public",
            "recurring_interval": "month" if recurring else None,
            "recurring_interval_count": 1 if recurring else None,
            "meter_interval": None,
            "meter_interval_count": None,
            "is_recurring": recurring,
            "is_archived": False,
            "is_deletable": False,  # referenced by a subscription or an order
            "organization_id": self.organization["id"],
            "metadata": {},
            "prices": [price],
            "benefits": [],
            "medias": [],
            "attached_custom_fields": [],
        }
        self.products[product_id] = product
        self._product_by_kind[kind] = product_id
        return product

    def _customer(
        self,
        email: str | None = None,
        *,
        external_id: str | None = None,
        customer_type: Literal["individual", "team"] = "team",
    ) -> JSON:
        if email is not None:
            for existing in self.customers.values():
                if existing["email"] == email:
                    return existing
        now = iso(self.now())
        customer_id = self._new_id()
        customer: JSON = {
            "id": customer_id,
            "created_at": now,
            "modified_at": None,
            "metadata": {},
            "external_id": external_id,
            "email": email or f"billing-{customer_id[:8]}@example.com",
            "email_verified": False,
            "type": customer_type,
            "name": None,
            "billing_name": None,
            "billing_address": None,
            "tax_id": None,
            "locale": None,
            "organization_id": self.organization["id"],
            "default_payment_method_id": None,
            "deleted_at": None,
            "first_user_event_at": None,
            "avatar_url": None,
        }
        self.customers[customer_id] = customer
        if self.member_model_enabled:
            # With the member model every customer has an owner member.
            self._create_member(customer_id, customer["email"], role="owner")
        return customer

    def _create_member(
        self,
        customer_id: str,
        email: str,
        *,
        role: MemberRole = "member",
        external_id: str | None = None,
        name: str | None = None,
    ) -> JSON:
        member: JSON = {
            "id": self._new_id(),
            "created_at": iso(self.now()),
            "modified_at": None,
            "customer_id": customer_id,
            "email": email,
            "name": name,
            "external_id": external_id,
            "role": role,
        }
        self.members[member["id"]] = member
        self._emit("member.created", member)
        return member

    def _member_by_email(self, customer_id: str, email: str) -> JSON | None:
        for member in self.members.values():
            if member["customer_id"] == customer_id and member["email"] == email:
                return member
        return None

    # ------------------------------------------------------------------ containers

    def create_subscription(
        self,
        *,
        seats: int | None = 1,
        status: str = "active",
        customer_email: str | None = None,
        started: bool = True,
        seat_based_price: bool | None = None,
        started_at: datetime | None = None,
        with_order: bool | None = None,
    ) -> JSON:
        """Create a subscription; `seats=None` makes a non-seat one.

        `seat_based_price` defaults to "seat-based exactly when `seats` is a number".
        `with_order` (default: the state's `subscription_orders`) also creates the paid
        `subscription_create` order of a started subscription, carrying its `seats` as
        Polar's does.
        """
        if seat_based_price is None:
            seat_based_price = seats is not None
        now = self.now()
        start = (started_at or now) if started else None
        product = self._product(recurring=True, seat_based=seat_based_price)
        customer = self._customer(customer_email)
        period_start = start or now
        sub_id = self._new_id()
        subscription: JSON = {
            "created_at": iso(now),
            "modified_at": None,
            "id": sub_id,
            "amount": 1000 * (seats or 1) if seat_based_price else 2000,
            "currency": "usd",
            "recurring_interval": "month",
            "recurring_interval_count": 1,
            "status": status,
            "current_period_start": iso(period_start),
            "current_period_end": iso(period_start + timedelta(days=30)),
            "current_meter_period_start": None,
            "current_meter_period_end": None,
            "trial_start": None,
            "trial_end": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "started_at": iso(start),
            "ends_at": None,
            "ended_at": None,
            "past_due_at": None,
            "pause_at_period_end": False,
            "paused_at": None,
            "resumes_at": None,
            "customer_id": customer["id"],
            "product_id": product["id"],
            "discount_id": None,
            "checkout_id": None,
            "seats": seats,
            "units": None,
            "customer_cancellation_reason": None,
            "customer_cancellation_comment": None,
            "metadata": {},
            "custom_field_data": {},
            "customer": copy.deepcopy(customer),
            "product": copy.deepcopy(product),
            "discount": None,
            "prices": copy.deepcopy(product["prices"]),
            "meters": [],
            "pending_update": None,
        }
        self.subscriptions[sub_id] = subscription
        self._containers[sub_id] = _Container("subscription", sub_id, customer["id"])
        self._emit("subscription.created", subscription)
        if started and status == "active":
            self._emit("subscription.active", subscription)
        if started and (self.subscription_orders if with_order is None else with_order):
            self.create_subscription_order(sub_id, billing_reason="subscription_create")
        return copy.deepcopy(subscription)

    def create_order(
        self,
        *,
        seats: int | None = 1,
        customer_email: str | None = None,
        status: str = "paid",
        created_at: datetime | None = None,
    ) -> JSON:
        """Create a one-time order; `seats=None` makes a non-seat one."""
        product = self._product(recurring=False, seat_based=seats is not None)
        customer = self._customer(customer_email)
        amount = 1000 * seats if seats is not None else 2000
        return self._new_order(
            customer=customer,
            product=product,
            amount=amount,
            seats=seats,
            status=status,
            billing_reason="purchase",
            created_at=created_at,
        )

    def create_subscription_order(
        self, sub_id: str, *, billing_reason: BillingReason = "subscription_cycle"
    ) -> JSON:
        """The paid order of a subscription payment, as Polar creates it.

        The first one (`subscription_create`, from the checkout) carries the checkout's
        `seats`; renewals (`subscription_cycle`) carry none. Either answers a seat list by
        `order_id` with no seats and `total_seats` = its `seats` (Polar reads `order.seats`),
        though its seats live on the subscription.
        """
        subscription = self._subscription(sub_id)
        customer = self.customers[subscription["customer_id"]]
        product = self.products[subscription["product_id"]]
        return self._new_order(
            customer=customer,
            product=product,
            amount=subscription["amount"],
            seats=subscription["seats"] if billing_reason == "subscription_create" else None,
            status="paid",
            billing_reason=billing_reason,
            subscription=subscription,
        )

    def _new_order(
        self,
        *,
        customer: JSON,
        product: JSON,
        amount: int,
        seats: int | None,
        status: str,
        billing_reason: BillingReason,
        created_at: datetime | None = None,
        subscription: JSON | None = None,
    ) -> JSON:
        now = created_at or self.now()
        order_id = self._new_id()
        order_product = {
            k: v
            for k, v in product.items()
            # Polar's `OrderProduct`: the product without its lists and `is_deletable`.
            if k not in {"prices", "benefits", "medias", "attached_custom_fields", "is_deletable"}
        }
        period: tuple[str | None, str | None] = (None, None)
        if subscription is not None:
            period = (subscription["current_period_start"], subscription["current_period_end"])
        order: JSON = {
            "id": order_id,
            "created_at": iso(now),
            "modified_at": None,
            "status": status,
            "paid": status == "paid",
            "subtotal_amount": amount,
            "discount_amount": 0,
            "net_amount": amount,
            "tax_amount": 0,
            "total_amount": amount,
            "applied_balance_amount": 0,
            "due_amount": 0,
            "refunded_amount": 0,
            "refunded_tax_amount": 0,
            "currency": "usd",
            "billing_reason": billing_reason,
            "billing_name": None,
            "billing_address": None,
            "invoice_number": f"SIM-{len(self.orders) + 1:05d}",
            "is_invoice_generated": False,
            "receipt_number": None,
            "seats": seats,
            "units": None,
            "customer_id": customer["id"],
            "product_id": product["id"],
            "discount_id": None,
            "subscription_id": subscription["id"] if subscription is not None else None,
            "checkout_id": None,
            "next_payment_attempt_at": None,
            "metadata": {},
            "custom_field_data": {},
            "platform_fee_amount": 0,
            "platform_fee_currency": None,
            "customer": copy.deepcopy(customer),
            "product": order_product,
            "discount": None,
            "subscription": {k: copy.deepcopy(subscription[k]) for k in ORDER_SUBSCRIPTION_KEYS}
            if subscription is not None
            else None,
            "items": [
                {
                    "created_at": iso(now),
                    "modified_at": None,
                    "id": self._new_id(),
                    "label": product["name"],
                    "amount": amount,
                    "tax_amount": 0,
                    "proration": False,
                    "product_price_id": product["prices"][0]["id"],
                    "start_timestamp": period[0],
                    "end_timestamp": period[1],
                }
            ],
            "description": product["name"],
            "refundable_amount": amount,
            "refundable_tax_amount": 0,
        }
        self.orders[order_id] = order
        self._containers[order_id] = _Container("order", order_id, customer["id"])
        self._emit("order.created", order)
        if status == "paid":
            self._emit("order.paid", order)
        return copy.deepcopy(order)

    def _container_json(self, container: _Container) -> JSON:
        if container.kind == "subscription":
            return self.subscriptions[container.id]
        return self.orders[container.id]

    def _total_seats(self, container: _Container) -> int:
        seats = self._container_json(container).get("seats")
        return int(seats) if seats is not None else 0

    def _occupied(self, container: _Container) -> int:
        # Expired pending seats still count: Polar never cleans them up.
        return sum(
            1 for seat_id in container.seat_ids if self.seats[seat_id]["status"] != "revoked"
        )

    def available_seats(self, container_id: str) -> int:
        container = self._get_container(container_id)
        return max(0, self._total_seats(container) - self._occupied(container))

    def _get_container(self, container_id: str) -> _Container:
        container = self._containers.get(container_id)
        if container is None:
            raise SimulatorError(404, "ResourceNotFound", "Not found")
        return container

    def _require_feature(self) -> None:
        if not self.seat_feature_enabled:
            raise SimulatorError(
                403, "FeatureNotEnabled", "Seat-based pricing is not enabled for this organization"
            )

    # ------------------------------------------------------------------ seats

    def _seat(self, seat_id: str) -> JSON:
        seat = self.seats.get(seat_id)
        if seat is None:
            raise SimulatorError(404, "ResourceNotFound", "Seat not found")
        return seat

    def get_seat(self, seat_id: str) -> JSON:
        return copy.deepcopy(self._seat(seat_id))

    def invitation_token(self, seat_id: str) -> str | None:
        """The secret the invitee would get by e-mail (never part of the org API)."""
        self._seat(seat_id)
        return self._tokens.get(seat_id)

    def drop_invitation_token(self, seat_id: str) -> None:
        """Leave a pending seat without a token (a state Polar's data can be in)."""
        self._seat(seat_id)
        self._tokens.pop(seat_id, None)

    def resend_count(self, seat_id: str) -> int:
        return self._resends.get(seat_id, 0)

    def _resolve_member(
        self,
        billing_customer_id: str,
        *,
        email: str | None,
        member_id: str | None,
        external_member_id: str | None,
        customer_id: str | None,
        external_customer_id: str | None,
    ) -> JSON:
        if member_id is not None:
            member = self.members.get(member_id)
            if member is None or member["customer_id"] != billing_customer_id:
                raise SimulatorError(404, "MemberNotFound", f"Member not found: {member_id}")
            return member
        if external_member_id is not None:
            for member in self.members.values():
                if (
                    member["customer_id"] == billing_customer_id
                    and member["external_id"] == external_member_id
                ):
                    if email is not None and member["email"] != email:
                        raise SimulatorError(
                            400,
                            "MemberEmailMismatch",
                            f"Member {external_member_id} has a different email",
                        )
                    return member
            if email is None:
                raise SimulatorError(
                    404, "MemberNotFound", f"Member not found: {external_member_id}"
                )
            return self._create_member(billing_customer_id, email, external_id=external_member_id)
        if customer_id is not None or external_customer_id is not None:
            found = next(
                (
                    c
                    for c in self.customers.values()
                    if (customer_id is not None and c["id"] == customer_id)
                    or (
                        external_customer_id is not None
                        and c["external_id"] == external_customer_id
                    )
                ),
                None,
            )
            if found is None:
                raise SimulatorError(
                    404,
                    "CustomerNotFound",
                    f"Customer not found: {external_customer_id or customer_id}",
                )
            email = found["email"]
        assert email is not None
        existing = self._member_by_email(billing_customer_id, email)
        return existing or self._create_member(billing_customer_id, email)

    def _holder_customer(
        self, *, email: str | None, customer_id: str | None, external_customer_id: str | None
    ) -> JSON:
        """Without the member model the seat holder is a customer: found, or made from `email`."""
        if customer_id is not None or external_customer_id is not None:
            for customer in self.customers.values():
                if (customer_id is not None and customer["id"] == customer_id) or (
                    external_customer_id is not None
                    and customer["external_id"] == external_customer_id
                ):
                    return customer
            shown = external_customer_id or customer_id
            raise SimulatorError(404, "CustomerNotFound", f"Customer not found: {shown}")
        assert email is not None
        return self._customer(email, customer_type="individual")

    def assign(
        self,
        *,
        subscription_id: str | None = None,
        order_id: str | None = None,
        email: str | None = None,
        member_id: str | None = None,
        external_member_id: str | None = None,
        customer_id: str | None = None,
        external_customer_id: str | None = None,
        metadata: JSON | None = None,
        immediate_claim: bool = False,
    ) -> JSON:
        """Assign a seat like `POST /v1/customer-seats`."""
        if (subscription_id is None) == (order_id is None):
            raise SimulatorValidationError(
                [
                    {
                        "type": "value_error",
                        "loc": ["body"],
                        "msg": "Value error, Exactly one of subscription_id, checkout_id, "
                        "or order_id must be provided",
                        "input": {"subscription_id": subscription_id, "order_id": order_id},
                        "ctx": {
                            "error": "Exactly one of subscription_id, checkout_id, or order_id"
                        },
                    }
                ]
            )
        metadata_errors = _metadata_errors(metadata)
        if metadata_errors:
            raise SimulatorValidationError(metadata_errors)
        identifiers = [email, member_id, external_member_id, customer_id, external_customer_id]
        given = sum(1 for value in identifiers if value is not None)
        email_with_external_member = given == 2 and email is not None and external_member_id
        if given != 1 and not email_with_external_member:
            raise SimulatorError(
                400,
                "InvalidSeatAssignmentRequest",
                "Exactly one of email, external_customer_id, or customer_id must be provided",
            )
        container_id = subscription_id or order_id
        assert container_id is not None
        container = self._containers.get(container_id)
        if container is None or container.kind != ("subscription" if subscription_id else "order"):
            raise SimulatorError(404, "ResourceNotFound", "Not found")
        self._require_feature()
        container_json = self._container_json(container)
        if container.kind == "order" and container_json["status"] == "pending":
            raise SimulatorError(
                400, "SeatNotAvailable", "Order must be paid before assigning seats"
            )
        if self._total_seats(container) - self._occupied(container) <= 0:
            raise SimulatorError(400, "SeatNotAvailable", f"No available seats for {container_id}")
        member: JSON | None = None
        if self.member_model_enabled:
            # The seat points at the billing customer and holds a member of it.
            member = self._resolve_member(
                container.customer_id,
                email=email,
                member_id=member_id,
                external_member_id=external_member_id,
                customer_id=customer_id,
                external_customer_id=external_customer_id,
            )
            holder = self.customers[container.customer_id]
            taken = [self.seats[sid]["member_id"] == member["id"] for sid in container.seat_ids]
            shown = email or member["email"]
        else:
            if member_id is not None or external_member_id is not None:
                raise SimulatorError(
                    400,
                    "InvalidSeatAssignmentRequest",
                    "Exactly one of email, external_customer_id, or customer_id must be provided",
                )
            # The seat points at the holder's own customer; the address is its e-mail.
            holder = self._holder_customer(
                email=email, customer_id=customer_id, external_customer_id=external_customer_id
            )
            taken = [self.seats[sid]["customer_id"] == holder["id"] for sid in container.seat_ids]
            shown = email or external_customer_id or str(customer_id)
        if any(
            same and self.seats[sid]["status"] != "revoked"
            for sid, same in zip(container.seat_ids, taken, strict=True)
        ):
            raise SimulatorError(
                400, "SeatAlreadyAssigned", f"Seat already assigned to customer {shown}"
            )

        now = self.now()
        revoked = [sid for sid in container.seat_ids if self.seats[sid]["status"] == "revoked"]
        if revoked:
            # Polar takes whichever revoked row the database returns first: arbitrary.
            seat = self.seats[self.rng.choice(revoked)]
        else:
            seat = {
                "created_at": iso(now),
                "modified_at": None,
                "id": self._new_id(),
                "subscription_id": subscription_id,
                "order_id": order_id,
                "status": "pending",
                "customer_id": None,
                "member_id": None,
                "member": None,
                "email": None,
                "customer_email": None,
                "invitation_token_expires_at": None,
                "claimed_at": None,
                "revoked_at": None,
                "seat_metadata": None,
            }
            self.seats[seat["id"]] = seat
            container.seat_ids.append(seat["id"])
        seat.update(
            {
                "modified_at": iso(now) if revoked else None,
                "status": "claimed" if immediate_claim else "pending",
                "customer_id": holder["id"],
                "member_id": member["id"] if member is not None else None,
                "member": copy.deepcopy(member),
                "email": member["email"] if member is not None else None,
                "customer_email": holder["email"],
                "invitation_token_expires_at": None
                if immediate_claim
                else iso(now + INVITATION_TTL),
                "claimed_at": iso(now) if immediate_claim else None,
                "revoked_at": None,
                "seat_metadata": copy.deepcopy(metadata) if metadata else {},
            }
        )
        if immediate_claim:
            self._tokens.pop(seat["id"], None)
            self._emit("customer_seat.claimed", seat)
        else:
            self._tokens[seat["id"]] = secrets.token_urlsafe(32)
            self._emit("customer_seat.assigned", seat)
        return copy.deepcopy(seat)

    def _seat_by_token(self, token: str) -> JSON | None:
        for seat_id, seat_token in self._tokens.items():
            if secrets.compare_digest(seat_token, token):
                return self.seats[seat_id]
        return None

    def _claimable(self, seat: JSON | None) -> bool:
        if seat is None or seat["status"] != "pending":
            return False
        expires = parse_iso(seat["invitation_token_expires_at"])
        return expires is None or expires >= self.now()

    def claim_info(self, token: str) -> JSON:
        """`GET /v1/customer-seats/claim/{token}`: read-only, safe for e-mail scanners."""
        seat = self._seat_by_token(token)
        if seat is None or not self._claimable(seat):
            raise SimulatorError(404, "ResourceNotFound", "Invalid or expired invitation token")
        self._require_feature()
        container = self._containers[seat["subscription_id"] or seat["order_id"]]
        product = self._container_json(container)["product"]
        return {
            "product_name": product["name"],
            "product_id": product["id"],
            "organization_name": self.organization["name"],
            "organization_slug": self.organization["slug"],
            "customer_email": seat["email"] or seat["customer_email"] or "",
            "can_claim": True,
        }

    def claim_by_token(self, token: str) -> JSON:
        """`POST /v1/customer-seats/claim`: the invitee accepts; the token is single-use."""
        seat = self._seat_by_token(token)
        if seat is None or not self._claimable(seat):
            raise SimulatorError(
                400, "InvalidInvitationToken", "Invalid or expired invitation token"
            )
        self._require_feature()
        now = iso(self.now())
        seat.update({"status": "claimed", "claimed_at": now, "modified_at": now})
        self._tokens.pop(seat["id"], None)
        self._emit("customer_seat.claimed", seat)
        return copy.deepcopy(seat)

    def claim(self, seat_id: str) -> JSON:
        """The invitee of `seat_id` claims with the token from their e-mail."""
        token = self._tokens.get(self._seat(seat_id)["id"])
        if token is None:
            raise SimulatorError(
                400, "InvalidInvitationToken", "Invalid or expired invitation token"
            )
        return self.claim_by_token(token)

    def revoke(self, seat_id: str) -> JSON:
        """`DELETE /v1/customer-seats/{id}`; revoking a revoked seat changes nothing."""
        seat = self._seat(seat_id)
        self._require_feature()
        if seat["status"] == "revoked":
            return copy.deepcopy(seat)
        now = iso(self.now())
        # Polar keeps invitation_token_expires_at on revoke (and on claim).
        seat.update(
            {
                "status": "revoked",
                "revoked_at": now,
                "modified_at": now,
                "customer_id": None,
                "customer_email": None,
                "member_id": None,
                "member": None,
                "email": None,
            }
        )
        self._tokens.pop(seat_id, None)
        self._emit("customer_seat.revoked", seat)
        return copy.deepcopy(seat)

    def resend(self, seat_id: str) -> JSON:
        """Re-send the invitation: same token, same expiry, no webhook."""
        seat = self._seat(seat_id)
        self._require_feature()
        if seat["status"] != "pending":
            raise SimulatorError(400, "SeatNotPending", "Seat is not in pending status")
        token = self._tokens.get(seat_id)
        if token is None or not (seat["email"] or seat["customer_email"]):
            raise SimulatorError(
                400, "InvalidInvitationToken", "Invalid or expired invitation token"
            )
        self._resends[seat_id] = self._resends.get(seat_id, 0) + 1
        return copy.deepcopy(seat)

    def list_seats(
        self, *, subscription_id: str | None = None, order_id: str | None = None
    ) -> JSON:
        """`GET /v1/customer-seats`: SeatsList, revoked rows included, order not guaranteed."""
        if subscription_id is None and order_id is None:
            raise SimulatorError(
                400, "BadRequest", "Either subscription_id or order_id must be provided"
            )
        container_id = subscription_id or order_id
        assert container_id is not None
        container = self._containers.get(container_id)
        wanted = "subscription" if subscription_id is not None else "order"
        if container is None or container.kind != wanted:
            raise SimulatorError(404, "ResourceNotFound", f"{wanted.capitalize()} not found")
        self._require_feature()
        total = self._total_seats(container)
        if total == 0 and not container.seat_ids:
            return {"seats": [], "available_seats": 0, "total_seats": 0}
        seats = [copy.deepcopy(self.seats[seat_id]) for seat_id in container.seat_ids]
        self.rng.shuffle(seats)
        return {
            "seats": seats,
            "available_seats": max(0, total - self._occupied(container)),
            "total_seats": total,
        }

    # ------------------------------------------------------------------ lifecycle

    def _subscription(self, sub_id: str) -> JSON:
        subscription = self.subscriptions.get(sub_id)
        if subscription is None:
            raise SimulatorError(404, "ResourceNotFound", "Subscription not found")
        return subscription

    def _revoke_all(self, container_id: str) -> int:
        container = self._get_container(container_id)
        active = [sid for sid in container.seat_ids if self.seats[sid]["status"] != "revoked"]
        for seat_id in active:
            self.revoke(seat_id)
        return len(active)

    def _touch(self, subscription: JSON, **changes: Any) -> None:
        subscription.update(changes)
        subscription["modified_at"] = iso(self.now())

    def cancel_subscription(self, sub_id: str, *, immediately: bool = True) -> JSON:
        """Cancel now (seats revoked, one webhook each) or at period end (seats kept)."""
        subscription = self._subscription(sub_id)
        now = iso(self.now())
        if immediately:
            self._revoke_all(sub_id)
            self._touch(subscription, status="canceled", canceled_at=now, ends_at=now, ended_at=now)
        else:
            self._touch(
                subscription,
                cancel_at_period_end=True,
                canceled_at=now,
                ends_at=subscription["current_period_end"],
            )
        self._emit("subscription.canceled", subscription)
        self._emit("subscription.updated", subscription)
        return copy.deepcopy(subscription)

    def uncancel_subscription(self, sub_id: str) -> JSON:
        subscription = self._subscription(sub_id)
        self._touch(subscription, cancel_at_period_end=False, canceled_at=None, ends_at=None)
        self._emit("subscription.uncanceled", subscription)
        self._emit("subscription.updated", subscription)
        return copy.deepcopy(subscription)

    def revoke_subscription(self, sub_id: str) -> JSON:
        """End the subscription now (e.g. the period ended after a cancel)."""
        subscription = self._subscription(sub_id)
        now = iso(self.now())
        self._revoke_all(sub_id)
        self._touch(subscription, status="canceled", ended_at=now, ends_at=now)
        if subscription["canceled_at"] is None:
            subscription["canceled_at"] = now
        self._emit("subscription.revoked", subscription)
        self._emit("subscription.updated", subscription)
        return copy.deepcopy(subscription)

    def pause_subscription(self, sub_id: str) -> JSON:
        subscription = self._subscription(sub_id)
        self._revoke_all(sub_id)
        self._touch(subscription, status="paused", paused_at=iso(self.now()))
        self._emit("subscription.paused", subscription)
        self._emit("subscription.updated", subscription)
        return copy.deepcopy(subscription)

    def resume_subscription(self, sub_id: str) -> JSON:
        """Resume a paused subscription; its seats are NOT restored."""
        subscription = self._subscription(sub_id)
        self._touch(subscription, status="active", paused_at=None, resumes_at=None)
        self._emit("subscription.resumed", subscription)
        self._emit("subscription.updated", subscription)
        return copy.deepcopy(subscription)

    def mark_past_due(self, sub_id: str) -> JSON:
        """past_due with no grace period: every seat is revoked."""
        subscription = self._subscription(sub_id)
        self._revoke_all(sub_id)
        self._touch(subscription, status="past_due", past_due_at=iso(self.now()))
        self._emit("subscription.past_due", subscription)
        self._emit("subscription.updated", subscription)
        return copy.deepcopy(subscription)

    def mark_unpaid(self, sub_id: str) -> JSON:
        subscription = self._subscription(sub_id)
        self._revoke_all(sub_id)
        self._touch(subscription, status="unpaid")
        self._emit("subscription.updated", subscription)
        return copy.deepcopy(subscription)

    def set_seat_count(self, sub_id: str, seats: int | None, *, scheduled: bool = False) -> JSON:
        """Change the seat total now, or schedule it in `pending_update` (period end)."""
        subscription = self._subscription(sub_id)
        if scheduled:
            now = iso(self.now())
            self._touch(
                subscription,
                pending_update={
                    "created_at": now,
                    "modified_at": None,
                    "id": self._new_id(),
                    "applies_at": subscription["current_period_end"],
                    "product_id": None,
                    "seats": seats,
                    "units": None,
                },
            )
        else:
            self._touch(subscription, seats=seats)
        self._emit("subscription.updated", subscription)
        return copy.deepcopy(subscription)

    def apply_pending_update(self, sub_id: str) -> JSON:
        """Cycle the subscription, applying a scheduled seat change."""
        subscription = self._subscription(sub_id)
        pending = subscription["pending_update"]
        changes: JSON = {"pending_update": None}
        if pending is not None and pending["seats"] is not None:
            changes["seats"] = pending["seats"]
        self._touch(subscription, **changes)
        self._emit("subscription.cycled", subscription)
        self._emit("subscription.updated", subscription)
        if self.subscription_orders:
            self.create_subscription_order(sub_id, billing_reason="subscription_cycle")
        return copy.deepcopy(subscription)

    def refund_order(self, order_id: str) -> JSON:
        order = self.orders.get(order_id)
        if order is None:
            raise SimulatorError(404, "ResourceNotFound", "Order not found")
        order.update(
            status="refunded",
            refunded_amount=order["net_amount"],
            refundable_amount=0,
            modified_at=iso(self.now()),
        )
        self._emit("order.refunded", order)
        self._emit("order.updated", order)
        return copy.deepcopy(order)

    # ------------------------------------------------------------------ members

    def _member(self, member_id: str) -> JSON:
        member = self.members.get(member_id)
        if member is None:
            raise SimulatorError(404, "MemberNotFound", f"Member not found: {member_id}")
        return member

    def update_member_email(self, member_id: str, email: str) -> JSON:
        """Rewrite the member's e-mail on their live seats: only `member.updated` is sent."""
        member = self._member(member_id)
        now = iso(self.now())
        member.update(email=email, modified_at=now)
        for seat in self.seats.values():
            if seat["member_id"] == member_id and seat["status"] != "revoked":
                seat.update(email=email, member=copy.deepcopy(member), modified_at=now)
        self._emit("member.updated", member)
        return copy.deepcopy(member)

    def update_customer_email(self, customer_id: str, email: str) -> JSON:
        """Change a customer's e-mail: `customer.updated`, and no seat webhook.

        Every live seat pointing at the customer shows the new address in `customer_email`
        (without the member model that is the seat holder's only address); subscriptions
        and orders embed the customer as it is now.
        """
        customer = self.customers.get(customer_id)
        if customer is None:
            raise SimulatorError(404, "ResourceNotFound", "Customer not found")
        now = iso(self.now())
        customer.update(email=email, modified_at=now)
        for seat in self.seats.values():
            if seat["customer_id"] == customer_id and seat["status"] != "revoked":
                seat.update(customer_email=email, modified_at=now)
        for container in (*self.subscriptions.values(), *self.orders.values()):
            if container["customer_id"] == customer_id:
                container["customer"] = copy.deepcopy(customer)
        self._emit("customer.updated", customer)
        return copy.deepcopy(customer)

    def delete_member(self, member_id: str) -> JSON:
        """Delete a member: each of their live seats is revoked (one webhook each)."""
        member = self._member(member_id)
        for seat_id, seat in list(self.seats.items()):
            if seat["member_id"] == member_id and seat["status"] != "revoked":
                self.revoke(seat_id)
        del self.members[member_id]
        self._emit("member.deleted", member)
        return copy.deepcopy(member)

    # ------------------------------------------------------------------ discovery

    def get_subscription(self, sub_id: str) -> JSON:
        return copy.deepcopy(self._subscription(sub_id))

    def get_order(self, order_id: str) -> JSON:
        order = self.orders.get(order_id)
        if order is None:
            raise SimulatorError(404, "ResourceNotFound", "Order not found")
        return copy.deepcopy(order)

    def list_subscriptions(
        self, *, page: int = 1, limit: int = LIST_LIMIT_DEFAULT, sorting: list[str] | None = None
    ) -> JSON:
        """Started subscriptions only, newest first unless `sorting` says otherwise."""
        items = [s for s in self.subscriptions.values() if s["started_at"] is not None]
        return _paginate(items, page, limit, sorting or ["-started_at"], SUBSCRIPTION_SORT_FIELDS)

    def list_orders(
        self,
        *,
        page: int = 1,
        limit: int = LIST_LIMIT_DEFAULT,
        sorting: list[str] | None = None,
        product_billing_type: list[str] | None = None,
    ) -> JSON:
        """Newest first unless `sorting` says otherwise; `product_billing_type` filters by
        the product's billing type (`recurring`: subscription payments)."""
        wanted = product_billing_type or []
        errors = [
            {
                "type": "enum",
                "loc": ["query", "product_billing_type", index],
                "msg": "Input should be 'one_time' or 'recurring'",
                "input": value,
                "ctx": {"expected": "'one_time' or 'recurring'"},
            }
            for index, value in enumerate(wanted)
            if value not in PRODUCT_BILLING_TYPES
        ]
        if errors:
            raise SimulatorValidationError(errors)
        items = [
            order
            for order in self.orders.values()
            if not wanted
            or ("recurring" if self.products[order["product_id"]]["is_recurring"] else "one_time")
            in wanted
        ]
        return _paginate(items, page, limit, sorting or ["-created_at"], ORDER_SORT_FIELDS)


def _sort_value(item: JSON, field_name: str) -> Any:
    nested = {"customer": "email", "product": "name", "discount": "id", "subscription": "id"}
    if field_name in nested:
        value = item.get(field_name)
        return value.get(nested[field_name]) if isinstance(value, dict) else None
    if field_name == "amount" and "amount" not in item:
        return item.get("total_amount")
    return item.get(field_name)


def _paginate(
    items: list[JSON], page: int, limit: int, sorting: list[str], allowed: frozenset[str]
) -> JSON:
    errors: list[JSON] = [
        {
            "type": "greater_than",
            "loc": ["query", name],
            "msg": "Input should be greater than 0",
            "input": value,
            "ctx": {"gt": 0},
        }
        for name, value in (("page", page), ("limit", limit))
        if value < 1
    ]
    errors += [
        {
            "type": "enum",
            "loc": ["query", "sorting", index],
            "msg": "Input should be one of: " + ", ".join(sorted(allowed)),
            "input": criterion,
            "ctx": {"expected": ", ".join(sorted(allowed))},
        }
        for index, criterion in enumerate(sorting)
        if criterion.removeprefix("-") not in allowed
    ]
    if errors:
        raise SimulatorValidationError(errors)
    limit = min(limit, LIST_LIMIT_MAX)
    # Stable multi-key sort: apply criteria last to first, with id as the final tie-break.
    ordered = sorted(items, key=lambda item: str(item["id"]))
    for criterion in reversed(sorting):
        name = criterion.removeprefix("-")
        descending = criterion.startswith("-")
        present = [i for i in ordered if _sort_value(i, name) is not None]
        missing = [i for i in ordered if _sort_value(i, name) is None]
        present.sort(key=lambda item: _sort_value(item, name), reverse=descending)
        ordered = present + missing
    total = len(ordered)
    start = (page - 1) * limit
    return {
        "items": copy.deepcopy(ordered[start : start + limit]),
        "pagination": {"total_count": total, "max_page": math.ceil(total / limit)},
    }
