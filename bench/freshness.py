"""Freshness of a lone change: each change is made in the simulated Polar and its signed
webhook sent right after, with a 50 ms simulated API latency; for each one, the time from
sending it to the change being queryable in the mirror (a poller reads the seat table
every 10 ms, so add up to 10 ms).

By default 4 changes/s over 40 scopes for 60 s: each scope changes every 10 s, so every
change finds its scope quiet (no change for SYNC_QUIET_SECONDS, no sync waiting or
running) and is synced at once, the leading edge of the coalescing in `worker/queue.py`.
A faster rate per scope (e.g. `--rate 100 --scopes 10`, 10 changes/s per scope) measures
a saturated scope instead, where follow-ups wait for the quiet period by design: the
figures then carry no target.

    .venv/bin/python -m bench.freshness [--seconds 60] [--rate 4] [--scopes 40]
                                        [--latency 0.05] [--quiet S] [--max-wait S]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bench.common import Figure, percentile, report
from bench.pipeline import Pipeline, pipeline
from worker.simulator.state import parse_iso


@dataclass
class Expected:
    key: tuple[Any, ...]
    sent_at: float
    seen_at: float | None = None


def seat_key(status: str, email: str | None, claimed: Any, revoked: Any) -> tuple[Any, ...]:
    return (status, email, claimed, revoked)


class Tracker:
    """Per seat, the states Polar went through; a state seen in the mirror marks it and
    every earlier one of that seat as queryable (the mirror may skip straight past one)."""

    def __init__(self) -> None:
        self.by_seat: dict[str, list[Expected]] = {}
        self.scope_of: dict[str, str] = {}

    def expect(self, seat: dict[str, Any], sent_at: float) -> None:
        key = seat_key(
            seat["status"],
            seat["email"],
            parse_iso(seat["claimed_at"]),
            parse_iso(seat["revoked_at"]),
        )
        self.by_seat.setdefault(seat["id"], []).append(Expected(key, sent_at))
        self.scope_of[seat["id"]] = seat["subscription_id"]

    def waiting_scopes(self) -> set[str]:
        """The scopes with a change not yet seen (the poller reads only their seats)."""
        return {
            self.scope_of[seat_id]
            for seat_id, states in self.by_seat.items()
            if states[-1].seen_at is None
        }

    def observe(self, rows: list[Any], now: float) -> None:
        for row in rows:
            states = self.by_seat.get(row.id)
            if not states or states[-1].seen_at is not None:
                continue
            key = seat_key(row.status, row.email, row.claimed_at, row.revoked_at)
            for index in range(len(states) - 1, -1, -1):
                if states[index].key == key:
                    for earlier in states[: index + 1]:
                        if earlier.seen_at is None:
                            earlier.seen_at = now
                    break

    def all(self) -> list[Expected]:
        return [e for states in self.by_seat.values() for e in states]


async def poll(line: Pipeline, tracker: Tracker, stop: asyncio.Event) -> int:
    polls = 0
    while not stop.is_set():
        if scopes := tracker.waiting_scopes():
            rows = await line.mirror(scopes)
            tracker.observe(rows, time.monotonic())
            polls += 1
        await asyncio.sleep(0.01)
    return polls


async def main(args: argparse.Namespace) -> None:
    tracker = Tracker()
    async with pipeline(
        scopes=args.scopes,
        seats=10,
        capacity=30,
        latency=args.latency,
        budget=args.budget,
        quiet=args.quiet,
        max_wait=args.max_wait,
    ) as line:
        stop = asyncio.Event()
        poller = asyncio.create_task(poll(line, tracker, stop))
        tasks: list[asyncio.Task[int]] = []
        total = int(args.rate * args.seconds)
        started = time.monotonic()
        for number in range(total):
            due = started + number / args.rate
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            event = line.mutate(line.scopes[number % len(line.scopes)])
            tracker.expect(event.data, time.monotonic())
            tasks.append(asyncio.create_task(line.post(event)))
        sent_for = time.monotonic() - started
        await asyncio.gather(*tasks)
        for _ in range(600):  # the stragglers get at most 30 s
            if all(e.seen_at is not None for e in tracker.all()):
                break
            await asyncio.sleep(0.05)
        stop.set()
        polls = await poller
        calls = line.list_calls()
        window = line.window

    expected = tracker.all()
    lags = [e.seen_at - e.sent_at for e in expected if e.seen_at is not None]
    missing = len(expected) - len(lags)
    p50, p99 = percentile(lags, 50) * 1000, percentile(lags, 99) * 1000
    per_minute = calls / sent_for * 60
    # A change is lone when its scope's previous one is more than the quiet period (plus
    # a second for that change's own sync) behind it.
    per_scope_interval = args.scopes / args.rate
    lone = per_scope_interval > window.quiet + 1.0
    shape = f"lone: each scope changes every {per_scope_interval:g} s"
    if not lone:
        shape = f"NOT lone: each scope changes every {per_scope_interval:g} s (no target)"
    figures = [
        Figure(
            "webhooks sent",
            f"{len(expected)} in {sent_for:.1f} s",
            f"{args.rate:g}/s over {args.scopes} scopes; {shape}",
        ),
        Figure(
            "receipt -> queryable p50 (ms)",
            round(p50, 1),
            f"API latency {args.latency * 1000:g} ms + poll <= 10 ms",
            "<= 150 ms" if lone else "",
            p50 <= 150 if lone else None,
        ),
        Figure(
            "receipt -> queryable p99 (ms)",
            round(p99, 1),
            f"max {max(lags, default=0) * 1000:,.0f} ms; quiet {window.quiet:g} s",
            "<= 300 ms" if lone else "",
            p99 <= 300 if lone else None,
        ),
        Figure("changes never seen", missing, "", "0", missing == 0),
        Figure(
            "list calls per change",
            round(calls / max(1, len(expected)), 3),
            f"{round(per_minute)} list calls/min; Polar's budget: 500/min per organisation",
        ),
    ]
    report(
        "freshness" if lone else "freshness-saturated",
        figures,
        {
            "parameters": vars(args),
            "polls": polls,
            "list_calls": calls,
            "window": {"quiet_s": window.quiet, "max_wait_s": window.max_wait},
            "acks": line.acks,
            "p90_ms": percentile(lags, 90) * 1000,
        },
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=4.0, help="webhooks per second")
    parser.add_argument("--scopes", type=int, default=40)
    parser.add_argument("--latency", type=float, default=0.05, help="simulated API latency (s)")
    parser.add_argument(
        "--budget", type=int, default=None, help="Polar requests/min (default: unlimited)"
    )
    parser.add_argument("--quiet", type=float, default=None, help="SYNC_QUIET_SECONDS (0.5)")
    parser.add_argument("--max-wait", type=float, default=None, help="SYNC_MAX_WAIT_SECONDS (10)")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
