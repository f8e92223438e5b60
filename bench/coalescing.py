"""Coalescing: 1,000 signed webhooks over 50 scopes within about one second, each sent
right after the seat change it reports (so Polar's list changes during the burst).
Figures: seat-list calls made (per scope), and the time until the mirror equals Polar.

The worker allows one sync of a scope per SYNC_MIN_INTERVAL_SECONDS while events keep
coming (`worker/queue.py`), so a scope costs at most 1 + ceil(span / interval) list calls,
where span is how long its webhooks keep arriving (the receiver may stretch the burst).

    .venv/bin/python -m bench.coalescing [--webhooks 1000] [--scopes 50] [--latency 0.05]
                                         [--min-interval S]   (default: the worker's)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time

from bench.common import Figure, report
from bench.pipeline import pipeline


async def main(args: argparse.Namespace) -> None:
    async with pipeline(
        scopes=args.scopes,
        seats=10,
        capacity=30,
        latency=args.latency,
        budget=args.budget,
        max_jobs=args.max_jobs,
        min_interval=args.min_interval,
    ) as line:
        gate = asyncio.Semaphore(64)
        tasks: list[asyncio.Task[int]] = []

        async def send(event: object) -> int:
            async with gate:
                return await line.post(event)  # type: ignore[arg-type]

        started = time.monotonic()
        for number in range(args.webhooks):
            due = started + number * args.seconds / args.webhooks
            if (delay := due - time.monotonic()) > 0.002:
                await asyncio.sleep(delay)
            event = line.mutate(line.scopes[line.rng.randrange(len(line.scopes))])
            tasks.append(asyncio.create_task(send(event)))
        last_mutation = time.monotonic()
        await asyncio.gather(*tasks)
        all_acked = time.monotonic()
        correct_at = await line.wait_correct(60)
        await line.wait_quiet()
        calls = line.list_calls()
        per_scope = line.calls_per_scope()
        final_ok = await line.mirror_correct()

    per = calls / args.scopes
    worst = max(per_scope.values())
    interval = line.min_interval
    span = all_acked - started
    if interval > 0:
        bound = f"bound 1 + ceil({span:.1f} s / {interval:g} s) = {1 + math.ceil(span / interval)}"
    else:
        bound = "no interval: about one per sync while events come"
    figures = [
        Figure(
            "webhooks sent / acked 202",
            f"{args.webhooks} / {line.acks.get(202, 0)}",
            f"sent in {last_mutation - started:.2f} s, all acked at {all_acked - started:.2f} s",
        ),
        Figure(
            "list calls per scope",
            round(per, 3),
            f"{calls} calls / {args.scopes} scopes; uncoalesced: {args.webhooks / args.scopes:g}",
            "<= 1.2",
            per <= 1.2,
        ),
        Figure(
            "most list calls for one scope",
            worst,
            bound,
            "<= 2",
            worst <= 2,
        ),
        Figure(
            "mirror correct after first webhook (s)",
            round(correct_at - started, 3) if correct_at else "never",
            f"last change made at {last_mutation - started:.3f} s",
        ),
        Figure(
            "mirror correct after last webhook (s)",
            round(correct_at - last_mutation, 3) if correct_at else "never",
            f"one list call: {args.latency * 1000:g} ms",
        ),
        Figure("mirror equals Polar when quiet", str(final_ok), "", "True", final_ok),
    ]
    report(
        "coalescing",
        figures,
        {
            "parameters": vars(args),
            "list_calls": calls,
            "min_interval_s": interval,
            "calls_per_scope_histogram": _histogram(per_scope.values()),
        },
    )


def _histogram(values: object) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:  # type: ignore[attr-defined]
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--webhooks", type=int, default=1000)
    parser.add_argument("--scopes", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=1.0, help="spread of the burst")
    parser.add_argument("--latency", type=float, default=0.05, help="simulated API latency (s)")
    parser.add_argument("--budget", type=int, default=None, help="Polar requests/min (default off)")
    parser.add_argument("--max-jobs", type=int, default=10)
    parser.add_argument(
        "--min-interval",
        type=float,
        default=None,
        help="SYNC_MIN_INTERVAL_SECONDS for the worker (default: its own, 1 s; 0 = off)",
    )
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
