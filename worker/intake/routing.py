"""Which scopes (subscription or order) a webhook asks us to sync.

The payload is only a hint: the sync job always fetches Polar's authoritative seat list,
so routing errs towards syncing a scope rather than missing one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.models import Seat, SeatScope, SyncRun, utcnow

# A member's e-mail change rewrites `email` on their seats with no seat webhook, and a
# member's deletion revokes their seats; a member's creation gives a pending seat assigned
# by e-mail (or a seat of a customer migrating to the member model) its member.
MEMBER_TYPES = frozenset({"member.created", "member.updated", "member.deleted"})
# In organisations without the member model a seat's address is its `customer_email`,
# which changes with the customer's e-mail, again with no seat webhook.
CUSTOMER_TYPES = frozenset({"customer.updated"})
# A scope sync started this recently and not finished may be in flight (older: it died).
IN_FLIGHT_WINDOW = timedelta(minutes=10)


@dataclass(frozen=True, order=True)
class ScopeRef:
    """One subscription or order whose seats we mirror."""

    kind: str  # subscription | order
    scope_id: str


@dataclass(frozen=True)
class RouteHint:
    """What the payload alone says; `resolve` completes it with what the mirror knows."""

    scopes: tuple[ScopeRef, ...] = ()
    # A container whose payload does not look seat-based: sync it only if we mirror it
    # (it may have just lost its seats, and the mirror must see that).
    if_known: tuple[ScopeRef, ...] = ()
    # A seat event without a container id: the mirror knows which scope the slot is in.
    seat_id: str | None = None
    member_id: str | None = None
    member_emails: tuple[str, ...] = field(default=())
    # The seats of a customer (`customer_id`), and seats held at an address that is a
    # customer's (`customer_email`, the holder's address without the member model).
    customer_id: str | None = None
    customer_emails: tuple[str, ...] = field(default=())

    @property
    def needs_mirror(self) -> bool:
        """Whether `resolve` must look in the mirror (else the payload's scopes are all)."""
        return bool(self.if_known or self.seat_id is not None or self.follows_people)

    @property
    def follows_people(self) -> bool:
        """Routed by who holds seats, which Polar changes without a seat webhook."""
        return bool(
            self.member_id or self.member_emails or self.customer_id or self.customer_emails
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_seat_price(prices: Any) -> bool:
    if not isinstance(prices, list):
        return False
    return any(isinstance(p, Mapping) and p.get("amount_type") == "seat_based" for p in prices)


def is_seat_based_subscription(data: Mapping[str, Any]) -> bool:
    """Polar's rule: a number of `seats` (a missing key is null), a price whose
    `amount_type` is `seat_based`, or a scheduled seat count in `pending_update.seats`."""
    if _is_count(data.get("seats")):
        return True
    product = data.get("product")
    if _has_seat_price(data.get("prices")) or (
        isinstance(product, Mapping) and _has_seat_price(product.get("prices"))
    ):
        return True
    pending = data.get("pending_update")
    return isinstance(pending, Mapping) and _is_count(pending.get("seats"))


def hint_for(event_type: str, data: Any) -> RouteHint:
    """The scopes a payload points at, without touching the database."""
    if not isinstance(data, Mapping):
        return RouteHint()
    family = event_type.split(".", 1)[0]
    if family == "customer_seat":
        scopes: list[ScopeRef] = []
        if sub_id := _text(data.get("subscription_id")):
            scopes.append(ScopeRef("subscription", sub_id))
        if order_id := _text(data.get("order_id")):
            scopes.append(ScopeRef("order", order_id))
        if scopes:
            return RouteHint(scopes=tuple(scopes))
        return RouteHint(seat_id=_text(data.get("id")))
    if family == "subscription":
        sub_id = _text(data.get("id"))
        if sub_id is None:
            return RouteHint()
        ref = ScopeRef("subscription", sub_id)
        if is_seat_based_subscription(data):
            return RouteHint(scopes=(ref,))
        return RouteHint(if_known=(ref,))
    if family == "order":
        order_id = _text(data.get("id"))
        if order_id is None:
            return RouteHint()
        ref = ScopeRef("order", order_id)
        if subscription_id := _text(data.get("subscription_id")):
            # A subscription's own order (checkout or renewal) carries the subscription's
            # `seats`, but its seats live on the subscription: the order's list is empty.
            subscription = ScopeRef("subscription", subscription_id)
            if _is_count(data.get("seats")):
                return RouteHint(scopes=(subscription,), if_known=(ref,))
            return RouteHint(if_known=(ref, subscription))
        if _is_count(data.get("seats")):
            return RouteHint(scopes=(ref,))
        return RouteHint(if_known=(ref,))
    if event_type in MEMBER_TYPES:
        email = _text(data.get("email"))
        emails = (email,) if email else ()
        if event_type != "member.created":
            return RouteHint(member_id=_text(data.get("id")), member_emails=emails)
        # A new member may be the holder of a seat that has none yet: one assigned by
        # e-mail, or one of a customer whose organisation turns the member model on.
        return RouteHint(
            member_id=_text(data.get("id")),
            member_emails=emails,
            customer_id=_text(data.get("customer_id")),
            customer_emails=emails,
        )
    if event_type in CUSTOMER_TYPES:
        return RouteHint(customer_id=_text(data.get("id")))
    return RouteHint()


def _dedupe(scopes: Iterable[ScopeRef]) -> list[ScopeRef]:
    return sorted(set(scopes))


def _scope_of_seat(subscription_id: str | None, order_id: str | None) -> ScopeRef | None:
    if subscription_id:
        return ScopeRef("subscription", subscription_id)
    if order_id:
        return ScopeRef("order", order_id)
    return None


async def resolve(session: AsyncSession, hint: RouteHint) -> list[ScopeRef]:
    """The hint's scopes plus those only the mirror knows (a person's seats, known containers)."""
    if not hint.needs_mirror:
        return _dedupe(hint.scopes)
    found = list(hint.scopes)
    for ref in hint.if_known:
        if await session.get(SeatScope, (ref.kind, ref.scope_id)) is not None:
            found.append(ref)
    conditions = []
    if hint.seat_id is not None:
        conditions.append(col(Seat.id) == hint.seat_id)
    if hint.member_id is not None:
        conditions.append(col(Seat.member_id) == hint.member_id)
    for email in hint.member_emails:
        conditions.append(col(Seat.email) == email)
        conditions.append(col(Seat.member_email) == email)
    if hint.customer_id is not None:
        conditions.append(col(Seat.customer_id) == hint.customer_id)
    for email in hint.customer_emails:
        conditions.append(col(Seat.customer_email) == email)
    if conditions:
        rows = await session.execute(
            select(col(Seat.subscription_id), col(Seat.order_id)).where(or_(*conditions)).distinct()
        )
        for subscription_id, order_id in rows.all():
            seat_scope = _scope_of_seat(subscription_id, order_id)
            if seat_scope is not None:
                found.append(seat_scope)
    if hint.follows_people:
        found.extend(await _scopes_in_flight(session))
    return _dedupe(found)


async def _scopes_in_flight(session: AsyncSession) -> list[ScopeRef]:
    """Scopes whose sync has fetched but not committed: the member's or customer's seat may
    be in that fetch with the old e-mail and not yet in the mirror, so those scopes must
    sync again."""
    rows = await session.execute(
        select(col(SyncRun.scope_kind), col(SyncRun.scope_id))
        .where(
            col(SyncRun.kind) == "scope",
            col(SyncRun.finished_at).is_(None),
            col(SyncRun.started_at) >= utcnow() - IN_FLIGHT_WINDOW,
        )
        .distinct()
    )
    return [ScopeRef(kind, scope_id) for kind, scope_id in rows.all() if kind and scope_id]


async def route(session: AsyncSession, event_type: str, data: Any) -> list[ScopeRef]:
    """Every scope a delivery of `event_type` with payload `data` should sync."""
    return await resolve(session, hint_for(event_type, data))
