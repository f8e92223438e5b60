"""Polar's request and response bodies as we read and send them (API 2026-04 and 2026-10:
the same shapes). Unknown keys are ignored, so Polar may add fields without breaking us."""

from __future__ import annotations

from datetime import datetime
from hashlib import sha1
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr


class PolarModel(BaseModel):
    """A body Polar sends: unknown keys ignored, immutable once parsed."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Member(PolarModel):
    id: str
    created_at: datetime
    modified_at: datetime | None = None
    customer_id: str
    email: str
    name: str | None = None
    external_id: str | None = None
    role: str


class CustomerSeat(PolarModel):
    """Polar sends every key; nullable ones default to None so that a stand-in that omits
    them still parses."""

    id: str
    created_at: datetime
    modified_at: datetime | None = None
    subscription_id: str | None = None
    order_id: str | None = None
    status: Literal["pending", "claimed", "revoked"]
    customer_id: str | None = None
    member_id: str | None = None
    member: Member | None = None
    email: str | None = None
    customer_email: str | None = None
    invitation_token_expires_at: datetime | None = None
    claimed_at: datetime | None = None
    revoked_at: datetime | None = None
    seat_metadata: dict[str, Any] | None = None


class SeatsList(PolarModel):
    """GET /v1/customer-seats: every seat of one subscription or order, in one answer."""

    seats: list[CustomerSeat]
    available_seats: int
    total_seats: int
    _body_digest: bytes | None = PrivateAttr(default=None)

    @classmethod
    def from_body(cls, body: bytes) -> SeatsList:
        """Parse Polar's answer as it came, and remember the SHA-1 of its bytes: a resync
        that gets the very same answer need not compare the seats one by one (see
        `seat_scope.list_digest`). Raises pydantic's ValidationError."""
        parsed = cls.model_validate_json(body)
        parsed._body_digest = sha1(body, usedforsecurity=False).digest()
        return parsed

    @property
    def body_digest(self) -> bytes | None:
        """SHA-1 of the answer this list was parsed from (None: not parsed from one)."""
        return self._body_digest


class Price(PolarModel):
    amount_type: str | None = None


class PendingUpdate(PolarModel):
    seats: int | None = None


class Subscription(PolarModel):
    id: str
    status: str | None = None
    seats: int | None = None
    started_at: datetime | None = None
    prices: list[Price] = []
    pending_update: PendingUpdate | None = None

    @property
    def is_seat_based(self) -> bool:
        return self.seats is not None or any(p.amount_type == "seat_based" for p in self.prices)


class Order(PolarModel):
    id: str
    created_at: datetime | None = None
    seats: int | None = None
    subscription_id: str | None = None
    billing_reason: str | None = None

    @property
    def is_seat_based(self) -> bool:
        """A one-time order with a number of seats. An order of a subscription (its creation,
        a renewal, a seat change) repeats the subscription's seats, which Polar lists under
        the subscription, not under the order."""
        return self.seats is not None and self.subscription_id is None


class Pagination(PolarModel):
    total_count: int
    max_page: int


P = TypeVar("P", bound=PolarModel)


class Page(PolarModel, Generic[P]):
    """One page of a Polar list endpoint (`?page=&limit=`)."""

    items: list[P]
    pagination: Pagination


class SeatAssign(BaseModel):
    """Body of POST /v1/customer-seats: one container, one recipient."""

    model_config = ConfigDict(extra="forbid")

    subscription_id: str | None = None
    order_id: str | None = None
    email: str | None = None
    member_id: str | None = None
    external_member_id: str | None = None
    customer_id: str | None = None
    external_customer_id: str | None = None
    metadata: dict[str, Any] | None = None
    immediate_claim: bool = False
