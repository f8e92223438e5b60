"""A seeded chaos storm over the simulated Polar, and the invariants the mirror must hold.

`Storm` mutates the simulated organization at random (assigns, immediate claims, claims,
revokes, slot reuses, member e-mail changes and deletions, customer e-mail changes,
cancels, seat-count changes)
while `History` records every state each seat slot really went through in Polar. The
checks below compare the mirror with Polar after the storm and audit `seat_change`.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy import select
from sqlmodel import col

from worker import queue
from worker.models import (
    Seat,
    SeatChange,
    SeatScope,
    WebhookDelivery,
    WebhookDeliveryScope,
    seat_json,
)
from worker.platform.db import create_engine, session_factory
from worker.polar.schemas import CustomerSeat
from worker.simulator.server import SimulatedPolar
from worker.simulator.state import SimulatorError

SEATS_PATH = "/v1/customer-seats"
STATUSES = frozenset({"pending", "claimed", "revoked"})

# What a seat_change row says about a seat: status and holder.
SeatState = tuple[str | None, str | None, str | None]  # (status, member_id, email)


@dataclass(frozen=True)
class Profile:
    """How hard one storm shakes the system."""

    ops: int = 30
    subscriptions: int = 3
    orders: int = 2
    pause: float = 0.02  # max sleep between operations, so jobs and webhooks interleave
    # Now and then a longer quiet spell, so syncs land in the middle of the storm and the
    # mirror goes through intermediate states (and seat_change has something to audit).
    gap: float = 0.15
    gap_probability: float = 0.15
    # Webhook delivery path.
    drop: float = 0.1
    duplicate: float = 0.15
    delay: float = 0.15
    # Polar API faults on seat lists (each a probability per request).
    server_error: float = 0.12
    hang: float = 0.05
    cut: float = 0.03
    rate_limited: float = 0.01  # `retry-after: 1`, empty body: costs ~1-3 s, so rare
    latency: float = 0.05  # max time a seat list is in flight (redrawn at every operation)
    # Follow-up syncs of a scope wait this long after the previous one started (the
    # deferred-job path; the default second would leave the mirror few states to show).
    quiet: float = 0.1
    max_wait: float = 0.5


# ---------------------------------------------------------------------- Polar's truth


class History:
    """Every (status, member_id, email) each seat slot had in Polar, in order.

    Registered as a SimState listener: it runs after every event, and every mutation
    emits at least one event, so no state a fetch could have seen is missed.
    """

    def __init__(self, sim: SimulatedPolar | None = None) -> None:
        self.sim = sim
        self.states: dict[str, list[SeatState]] = {}
        # When each scope's seat list (seats, total, available) last changed in Polar.
        self.changed_at: dict[str, datetime] = {}
        self._scopes: dict[str, Any] = {}
        if sim is not None:
            sim.state.listeners.append(self.capture)

    @classmethod
    def of(cls, states: dict[str, list[SeatState]]) -> History:
        """A history written by hand (to test the audit itself)."""
        history = cls()
        history.states = states
        return history

    def capture(self) -> None:
        assert self.sim is not None
        state = self.sim.state
        lists: dict[str, list[Any]] = {}
        for seat_id, seat in sorted(state.seats.items()):
            now: SeatState = (seat["status"], seat["member_id"], seat["email"])
            seen = self.states.setdefault(seat_id, [])
            if not seen or seen[-1] != now:
                seen.append(now)
            lists.setdefault(seat["subscription_id"] or seat["order_id"], []).append(seat)
        for scope_id, container in [*state.subscriptions.items(), *state.orders.items()]:
            listed = (lists.get(scope_id, []), container["seats"], state.available_seats(scope_id))
            if self._scopes.get(scope_id) != listed:
                self._scopes[scope_id] = copy.deepcopy(listed)
                self.changed_at[scope_id] = state.now()


@dataclass
class Storm:
    """Random operations on the simulated organization, reproducible from `seed`."""

    sim: SimulatedPolar
    seed: int
    profile: Profile
    rng: random.Random = field(init=False)
    subscriptions: list[str] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    canceled: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    _renamed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # -------------------------------------------------------------- set up

    def create_scopes(self) -> None:
        state = self.sim.state
        for _ in range(self.profile.subscriptions):
            sub = state.create_subscription(seats=self.rng.randint(2, 5))
            self.subscriptions.append(sub["id"])
        for _ in range(self.profile.orders):
            self.orders.append(state.create_order(seats=self.rng.randint(2, 3))["id"])

    def add_faults(self) -> None:
        p, sim = self.profile, self.sim
        sim.add_fault(SEATS_PATH, status=500, probability=p.server_error / 2, times=None)
        sim.add_fault(SEATS_PATH, status=503, probability=p.server_error / 2, times=None)
        sim.add_fault(SEATS_PATH, "hang", probability=p.hang, times=None, hang_seconds=1.0)
        sim.add_fault(SEATS_PATH, "drop", probability=p.cut, times=None)
        sim.add_fault(
            SEATS_PATH,
            status=429,
            body="",
            headers={"retry-after": "1"},
            probability=p.rate_limited,
            times=1,
        )

    def calm(self) -> None:
        self.sim.clear_faults()
        self.sim.set_latency(0, SEATS_PATH)

    # -------------------------------------------------------------- the storm

    async def run(self) -> None:
        operations: list[tuple[Callable[[], str], int]] = [
            (self.assign, 8),
            (self.claim, 5),
            (self.revoke, 4),
            (self.reuse_slot, 3),
            (self.change_email, 3),
            (self.change_customer_email, 2),
            (self.change_seat_count, 2),
            (self.cancel, 1),
            (self.delete_member, 1),
        ]
        actions = [op for op, _ in operations]
        weights = [w for _, w in operations]
        for number in range(self.profile.ops):
            action = self.rng.choices(actions, weights)[0]
            try:
                outcome = action()
            except SimulatorError as exc:
                outcome = f"refused {exc.error}"
            self.log.append(f"{number:3d} {action.__name__}: {outcome}")
            self.counts[action.__name__] = self.counts.get(action.__name__, 0) + 1
            # Network jitter: lists sent from now on take this long to reach Polar's read.
            self.sim.set_latency(self.rng.uniform(0, self.profile.latency), SEATS_PATH)
            pause = self.rng.uniform(0, self.profile.pause)
            if self.rng.random() < self.profile.gap_probability:
                pause += self.rng.uniform(self.profile.gap / 2, self.profile.gap)
            await asyncio.sleep(pause)

    def _containers(self, *, open_only: bool = True) -> list[tuple[str, str]]:
        found = [("subscription", s) for s in self.subscriptions if s not in self.canceled]
        if not open_only:
            found += [("subscription", s) for s in self.canceled]
        return found + [("order", o) for o in self.orders]

    def _seats(self, *statuses: str) -> list[dict[str, Any]]:
        return [
            seat
            for seat_id, seat in sorted(self.sim.state.seats.items())
            if seat["status"] in statuses
        ]

    def _email(self) -> str:
        return f"person{self.rng.randint(0, 7)}@example.com"

    def _assign_in(self, kind: str, scope_id: str, email: str) -> str:
        immediate = self.rng.random() < 0.3
        state = self.sim.state
        if kind == "subscription":
            seat = state.assign(subscription_id=scope_id, email=email, immediate_claim=immediate)
        else:
            seat = state.assign(order_id=scope_id, email=email, immediate_claim=immediate)
        return f"{email} -> {seat['id'][:8]} {seat['status']} in {kind} {scope_id[:8]}"

    def assign(self) -> str:
        kind, scope_id = self.rng.choice(self._containers())
        return self._assign_in(kind, scope_id, self._email())

    def claim(self) -> str:
        pending = self._seats("pending")
        if not pending:
            return "nothing pending"
        seat = self.rng.choice(pending)
        self.sim.state.claim(seat["id"])
        return f"{seat['id'][:8]} claimed by {seat['email']}"

    def revoke(self) -> str:
        live = self._seats("pending", "claimed")
        if not live:
            return "nothing live"
        seat = self.rng.choice(live)
        self.sim.state.revoke(seat["id"])
        return f"{seat['id'][:8]} revoked from {seat['email']}"

    def reuse_slot(self) -> str:
        open_scopes = {scope_id for _, scope_id in self._containers()}
        live = [
            s
            for s in self._seats("pending", "claimed")
            if (s["subscription_id"] or s["order_id"]) in open_scopes
        ]
        if not live:
            return "nothing live"
        seat = self.rng.choice(live)
        self.sim.state.revoke(seat["id"])
        kind = "subscription" if seat["subscription_id"] else "order"
        scope_id = seat["subscription_id"] or seat["order_id"]
        return f"{seat['id'][:8]} revoked, then " + self._assign_in(kind, scope_id, self._email())

    def change_email(self) -> str:
        return self._rename("member", "renamed", self.sim.state.update_member_email)

    def change_customer_email(self) -> str:
        """Polar rewrites `customer_email` on the customer's live seats and sends only
        `customer.updated` (no seat webhook)."""
        return self._rename("customer", "billing", self.sim.state.update_customer_email)

    def _rename(self, holder: str, prefix: str, update: Callable[[str, str], object]) -> str:
        """A new address for the member or customer holding a random live seat."""
        live = self._seats("pending", "claimed")
        if not live:
            return "nothing live"
        holder_id = self.rng.choice(live)[f"{holder}_id"]
        self._renamed += 1
        email = f"{prefix}{self._renamed}@example.com"
        update(holder_id, email)
        return f"{holder} {holder_id[:8]} is now {email}"

    def change_seat_count(self) -> str:
        if not self.subscriptions:
            return "no subscription"
        sub_id = self.rng.choice(self.subscriptions)
        seats = self.rng.randint(1, 6)
        if self.rng.random() < 0.3:
            self.sim.state.set_seat_count(sub_id, seats, scheduled=True)
            self.sim.state.apply_pending_update(sub_id)
            return f"{sub_id[:8]} cycled to {seats} seats"
        self.sim.state.set_seat_count(sub_id, seats)
        return f"{sub_id[:8]} now has {seats} seats"

    def cancel(self) -> str:
        open_subs = [s for s in self.subscriptions if s not in self.canceled]
        if len(open_subs) <= 1:
            return "keeping the last open subscription"
        sub_id = self.rng.choice(open_subs)
        self.sim.state.cancel_subscription(sub_id)
        self.canceled.add(sub_id)
        return f"{sub_id[:8]} canceled"

    def delete_member(self) -> str:
        live = self._seats("pending", "claimed")
        if not live:
            return "nothing live"
        member_id = self.rng.choice(live)["member_id"]
        self.sim.state.delete_member(member_id)
        return f"member {member_id[:8]} deleted"

    def stats(self) -> dict[str, int]:
        sender, log = self.sim.webhooks, self.sim.log
        return {
            "events": len(sender.deliveries),
            "dropped": len(sender.dropped),
            "posts": len(sender.attempts),
            "lists": log.count(method="GET", path_prefix=SEATS_PATH),
            "lists_5xx": sum(
                log.count(method="GET", path_prefix=SEATS_PATH, status=s) for s in (500, 503)
            ),
            "lists_429": log.count(method="GET", path_prefix=SEATS_PATH, status=429),
            "lists_cut": log.count(method="GET", path_prefix=SEATS_PATH, status=0),
            "refused": sum(1 for line in self.log if "refused" in line),
        }

    # -------------------------------------------------------------- truth per scope

    def scopes(self) -> list[tuple[str, str]]:
        return self._containers(open_only=False)

    def polar_seats(self, kind: str, scope_id: str) -> dict[str, dict[str, Any]]:
        listed = self.sim.state.list_seats(**{f"{kind}_id": scope_id})
        return {
            s["id"]: CustomerSeat.model_validate(s).model_dump(mode="json") for s in listed["seats"]
        }

    def polar_counts(self, kind: str, scope_id: str) -> tuple[int, int]:
        listed = self.sim.state.list_seats(**{f"{kind}_id": scope_id})
        return listed["total_seats"], listed["available_seats"]


# ---------------------------------------------------------------------- the mirror


@dataclass
class Mirror:
    """What the database holds after a storm."""

    seats: list[Seat]
    scopes: list[SeatScope]
    changes: list[SeatChange]
    deliveries: list[WebhookDelivery]
    delivery_scopes: list[WebhookDeliveryScope]

    @classmethod
    async def load(cls, database_url: str) -> Mirror:
        engine = create_engine(database_url)
        try:
            async with session_factory(engine)() as session:

                async def rows(model: Any, *order: Any) -> list[Any]:
                    return list((await session.execute(select(model).order_by(*order))).scalars())

                return cls(
                    seats=await rows(Seat, col(Seat.id)),
                    scopes=await rows(SeatScope, col(SeatScope.scope_id)),
                    changes=await rows(SeatChange, col(SeatChange.id)),
                    deliveries=await rows(WebhookDelivery, col(WebhookDelivery.webhook_id)),
                    delivery_scopes=await rows(
                        WebhookDeliveryScope, col(WebhookDeliveryScope.received_at)
                    ),
                )
        finally:
            await engine.dispose()

    def scope_seats(self, kind: str, scope_id: str) -> list[Seat]:
        key = "subscription_id" if kind == "subscription" else "order_id"
        return [s for s in self.seats if getattr(s, key) == scope_id]


def mirror_differences(storm: Storm, mirror: Mirror) -> dict[str, list[str]]:
    """Per scope id, how the mirror differs from Polar (every CustomerSeat key)."""
    found: dict[str, list[str]] = {}
    for kind, scope_id in storm.scopes():
        problems: list[str] = []
        polar = storm.polar_seats(kind, scope_id)
        rows = mirror.scope_seats(kind, scope_id)
        ids = [row.id for row in rows]
        if len(ids) != len(set(ids)):
            problems.append(f"duplicate seat rows: {sorted(ids)}")
        mirrored = {
            row.id: CustomerSeat.model_validate(seat_json(row)).model_dump(mode="json")
            for row in rows
        }
        for seat_id in sorted(set(polar) | set(mirrored)):
            if seat_id not in mirrored:
                problems.append(f"seat {seat_id[:8]} missing from the mirror")
            elif seat_id not in polar:
                problems.append(f"seat {seat_id[:8]} is not in Polar's list")
            elif polar[seat_id] != mirrored[seat_id]:
                keys = sorted(
                    k for k in polar[seat_id] if polar[seat_id][k] != mirrored[seat_id][k]
                )
                detail = {k: (mirrored[seat_id][k], polar[seat_id][k]) for k in keys}
                problems.append(f"seat {seat_id[:8]} differs (mirror, polar): {detail}")
        problems += [f"seat {r.id[:8]} marked gone" for r in rows if r.gone_at is not None]
        scope = [s for s in mirror.scopes if (s.kind, s.scope_id) == (kind, scope_id)]
        if len(scope) != 1:
            problems.append(f"{len(scope)} seat_scope rows")
        elif (scope[0].total_seats, scope[0].available_seats) != storm.polar_counts(kind, scope_id):
            problems.append(
                f"seat counts {(scope[0].total_seats, scope[0].available_seats)} "
                f"!= Polar's {storm.polar_counts(kind, scope_id)}"
            )
        if problems:
            found[scope_id] = problems
    return found


def rung_after_last_change(history: History, mirror: Mirror) -> set[str]:
    """Scopes with an acknowledged delivery routed to them after their seat list last
    changed in Polar. The receiver promises that a fetch starting after each such delivery
    lands, so these scopes must equal Polar even before any resync. (A scope whose last
    change rang no doorbell, e.g. its webhook was dropped, waits for the resync.)"""
    return {
        row.scope_id
        for row in mirror.delivery_scopes
        if row.scope_id in history.changed_at and row.received_at > history.changed_at[row.scope_id]
    }


def inbox_problems(storm: Storm, mirror: Mirror) -> list[str]:
    """Every acknowledged delivery is stored once and processed (synced or ignored)."""
    sender = storm.sim.webhooks
    acknowledged = {wid for wid, d in sender.deliveries.items() if d.delivered}
    stored = {d.webhook_id: d for d in mirror.deliveries}
    problems = [f"acknowledged {wid} not stored" for wid in sorted(acknowledged - set(stored))]
    problems += [
        f"stored {wid} Polar never sent" for wid in sorted(set(stored) - set(sender.deliveries))
    ]
    for wid, delivery in sorted(stored.items()):
        if delivery.processed_at is None or delivery.outcome not in {"synced", "ignored"}:
            problems.append(
                f"delivery {wid} ({delivery.event_type}) left open: "
                f"processed_at={delivery.processed_at} outcome={delivery.outcome}"
            )
    return problems


# ---------------------------------------------------------------------- seat_change audit
#
# The rule, from Polar's seat lifecycle (a seat id is a slot; revoke nulls the holder;
# reuse takes any revoked slot; immediate_claim skips pending; e-mail changes rewrite
# live seats) and from what a mirror that only sees full lists can observe:
#
#  1. A seat's history starts with exactly one `created` row (old_* NULL); `created`
#     never appears again.
#  2. Each later row's old (status, member_id, email) is the previous row's new one: the
#     history is a chain, with no gap, no duplicate and no row from a stale fetch.
#  3. Statuses are pending, claimed or revoked. A revoked seat has no holder (member_id and
#     email NULL); a pending or claimed one has both.
#  4. `status` rows change the status. `holder` rows keep it and change member_id or
#     e-mail, which Polar only does to a live seat (pending or claimed).
#     Direct edges: pending->claimed (claim), pending|claimed->revoked (revoke, cancel,
#     member deletion), revoked->pending|claimed (slot reuse, immediate_claim). Because
#     the mirror only sees snapshots, a missed revoke+reassign also yields claimed->pending
#     and pending|claimed->pending|claimed with another holder; so every status pair is
#     reachable except revoked->revoked, which can never be a row (no holder to change).
#  5. `gone` keeps the state; `returned` only directly follows `gone`, and nothing else
#     happens to a seat while it is gone.
#  6. Time never runs backwards: the sequence of states the rows record is a subsequence
#     of the states the slot really went through in Polar (`History`), so an older
#     fetch never overwrote a newer one and no state was invented.
#  7. The history ends in the seat row's current state: no change went unrecorded.


def _old(row: SeatChange) -> SeatState:
    return (row.old_status, row.old_member_id, row.old_email)


def _new(row: SeatChange) -> SeatState:
    return (row.new_status, row.new_member_id, row.new_email)


def _is_subsequence(observed: list[SeatState], truth: list[SeatState]) -> bool:
    remaining = iter(truth)
    return all(any(state == real for real in remaining) for state in observed)


def seat_change_violations(
    changes: list[SeatChange], history: History, seats: list[Seat] | None = None
) -> list[str]:
    """Every impossible transition in `seat_change` (rules above), one line each."""
    current = {s.id: (s.status, s.member_id, s.email) for s in seats or []}
    by_seat: dict[str, list[SeatChange]] = {}
    for row in changes:
        by_seat.setdefault(row.seat_id, []).append(row)
    problems = [
        f"seat {seat_id[:8]}: no history" for seat_id in sorted(set(current) - set(by_seat))
    ]
    for seat_id, rows in sorted(by_seat.items()):
        rows.sort(key=lambda r: r.id or 0)
        where = f"seat {seat_id[:8]}"
        if seat_id in current and current[seat_id] != _new(rows[-1]):
            problems.append(
                f"{where}: history ends in {_new(rows[-1])}, seat is {current[seat_id]}"
            )
        first = rows[0]
        if first.change != "created" or _old(first) != (None, None, None):
            problems.append(f"{where}: history starts with {first.change} {_old(first)}")
        observed: list[SeatState] = []
        gone = False
        for previous, row in zip([None, *rows], rows, strict=False):
            old, new = _old(row), _new(row)
            label = f"{where} row {row.id} {row.change} {old} -> {new}"
            if previous is not None:
                if row.change == "created":
                    problems.append(f"{label}: created twice")
                if old != _new(previous):
                    problems.append(f"{label}: old state is not the previous row's new state")
            if new[0] not in STATUSES or (previous is not None and old[0] not in STATUSES):
                problems.append(f"{label}: unknown status")
            if (new[0] == "revoked") != (new[1] is None and new[2] is None):
                problems.append(f"{label}: holder does not match the status")
            if row.change == "status" and old[0] == new[0]:
                problems.append(f"{label}: status row without a status change")
            if row.change == "holder" and (old[0] != new[0] or old[1:] == new[1:]):
                problems.append(f"{label}: holder row must keep the status and change holder")
            if row.change in {"status", "holder"} and old[0] == new[0] == "revoked":
                problems.append(f"{label}: revoked -> revoked")
            if row.change not in {"created", "status", "holder", "gone", "returned"}:
                problems.append(f"{label}: unknown change")
            if row.change == "gone" and (gone or old != new):
                problems.append(f"{label}: gone twice or with a state change")
            if row.change == "returned" and not gone:
                problems.append(f"{label}: returned without being gone")
            if gone and row.change not in {"returned"}:
                problems.append(f"{label}: changed while gone")
            gone = row.change == "gone"
            if row.change != "gone" and (not observed or observed[-1] != new):
                observed.append(new)
        truth = history.states.get(seat_id, [])
        if not _is_subsequence(observed, truth):
            problems.append(f"{where}: recorded states {observed} are not in Polar's order {truth}")
    return problems


# ---------------------------------------------------------------------- queue


async def wait_until_drained(redis_url: str, *, within: float = 30.0) -> None:
    """Until no sync job is waiting, deferred or running (checked twice in a row)."""
    client = aioredis.Redis.from_url(redis_url)
    deadline = time.monotonic() + within
    quiet = 0
    try:
        while quiet < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not drained within {within}s")
            waiting = await client.zcard(queue.QUEUE_NAME)
            running = await client.keys("arq:in-progress:*")
            quiet = quiet + 1 if waiting == 0 and not running else 0
            await asyncio.sleep(0.03)
    finally:
        await client.aclose()
