"""Freshness: webhooks at a steady 100/s (each right after its seat change) with a 50 ms
simulated API latency; for each one, the time from sending it to the change being
queryable in the mirror (a poller reads the seat table every 10 ms, so add up to 10 ms).

Each scope gets 10 changes/s here, so the worker's SYNC_MIN_INTERVAL_SECONDS (one sync of
a scope per interval while events keep coming; default 1 s) bounds both the list calls
and the freshness: `--min-interval 0` measures the pipeline without it.

    .venv/bin/python -m bench.freshness [--seconds 30] [--rate 100] [--scopes 10]
                                        [--min-interval S]   (default: the worker's)
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

    def expect(self, seat: dict[str, Any], sent_at: float) -> None:
        key = seat_key(
            seat["status"],
            seat["email"],
            parse_iso(seat["claimed_at"]),
            parse_iso(seat["revoked_at"]),
        )
        self.by_seat.setdefault(seat["id"], []).append(Expected(key, sent_at))

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
        rows = await line.mirror()
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
        min_interval=args.min_interval,
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
        interval = line.min_interval

    expected = tracker.all()
    lags = [e.seen_at - e.sent_at for e in expected if e.seen_at is not None]
    missing = len(expected) - len(lags)
    p50, p99 = percentile(lags, 50) * 1000, percentile(lags, 99) * 1000
    per_minute = calls / sent_for * 60
    figures = [
        Figure(
            "webhooks sent",
            f"{len(expected)} in {sent_for:.1f} s",
            f"{args.rate:g}/s over {args.scopes} scopes",
        ),
        Figure(
            "receipt -> queryable p50 (ms)",
            round(p50, 1),
            f"API latency {args.latency * 1000:g} ms + poll <= 10 ms; min interval {interval:g} s",
            "<= 150 ms",
            p50 <= 150,
        ),
        Figure(
            "receipt -> queryable p99 (ms)",
            round(p99, 1),
            f"max {max(lags, default=0) * 1000:,.0f} ms",
            "<= 1000 ms",
            p99 <= 1000,
        ),
        Figure("changes never seen", missing, "", "0", missing == 0),
        Figure(
            "list calls per minute",
            round(per_minute),
            "Polar budget: 500/min per organisation",
            "",
        ),
    ]
    report(
        "freshness",
        figures,
        {
            "parameters": vars(args),
            "polls": polls,
            "list_calls": calls,
            "min_interval_s": interval,
            "acks": line.acks,
            "p90_ms": percentile(lags, 90) * 1000,
        },
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=100.0, help="webhooks per second")
    parser.add_argument("--scopes", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.05, help="simulated API latency (s)")
    parser.add_argument(
        "--budget", type=int, default=None, help="Polar requests/min (default: unlimited)"
    )
    parser.add_argument(
        "--min-interval",
        type=float,
        default=None,
        help="SYNC_MIN_INTERVAL_SECONDS for the worker (default: its own, 1 s; 0 = off)",
    )
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
