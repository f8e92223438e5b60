"""Full resync: 2,000 seat-based subscriptions discovered and synced by `resync_all`
under a scaled rate limit, against the lower bound calls / rate.

Scaling: the simulator's fixed window and the worker's budget window are both shrunk
from 60 s to `--window` (default 6 s) with the limit scaled alike (default 200 per 6 s =
2,000/min), so the run is short but the budget arithmetic is the production one.

    .venv/bin/python -m bench.resync [--scopes 2000] [--per-window 200] [--window 6]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import (
    REDIS_URL,
    SEATS_PATH,
    SIM_TOKEN,
    Figure,
    database,
    fresh_redis,
    make_settings,
    report,
    seed_scopes,
)
from worker.platform import logs
from worker.polar.budget import LANE_RESERVE
from worker.resources import WorkerResources
from worker.simulator.server import SimulatedPolar
from worker.sync.resync import resync_all


async def main(args: argparse.Namespace) -> None:
    logs.configure(log_format="json", level="WARNING")
    sim = SimulatedPolar(
        token=SIM_TOKEN,
        rate_limit=args.per_window,
        rate_window=args.window,
        latency=args.latency,
        seed=5,
    )
    seed_scopes(sim.state, scopes=args.scopes, seats=args.seats)
    await sim.start()
    try:
        async with database(args.db, "resync") as db_url, fresh_redis(REDIS_URL) as redis_url:
            settings = make_settings(
                db_url,
                sim.base_url,
                polar_requests_per_minute=args.per_window,
                polar_rate_window_seconds=args.window,
                resync_concurrency=args.concurrency,
            )
            resources = await WorkerResources.create(settings, redis_url=redis_url)
            try:
                started = time.monotonic()
                summary = await resync_all(resources, trigger="bench", force=True)
                wall = time.monotonic() - started
            finally:
                await resources.aclose()
            seats = await _count(db_url)
    finally:
        await sim.stop()

    assert summary is not None
    entries = sim.log.entries
    calls = len(entries)
    first = entries[0].at if entries else 0.0
    throttled = [e for e in entries if e.status == 429]
    late_429 = [e for e in throttled if e.at - first >= args.window]
    rate = args.per_window / args.window
    bound = calls / rate
    lane_share = 1 - LANE_RESERVE["resync"][0]  # webhooks are quiet during this run
    lane = rate * lane_share
    figures = [
        Figure(
            "scopes synced",
            f"{summary.synced} / {args.scopes}",
            f"{seats} seats mirrored; failed {summary.failed}",
            "all",
            summary.synced == args.scopes,
        ),
        Figure(
            "wall time (s)",
            round(wall, 1),
            f"calls / rate = {calls} / {rate * 60:,.0f} per min = {bound:.1f} s",
        ),
        Figure("wall / lower bound", round(wall / bound, 3), "1.0", "<= 1.1x", wall / bound <= 1.1),
        Figure(
            "wall / resync-lane bound",
            round(wall / (calls / lane), 3),
            f"resync lane = {lane_share:.0%} of budget: {calls / lane:.1f} s",
        ),
        Figure(
            "429s after the first window",
            len(late_429),
            f"all 429s: {len(throttled)}",
            "0",
            not late_429,
        ),
        Figure(
            "seat-list calls",
            sim.log.count(method="GET", path_prefix=SEATS_PATH),
            f"discovery pages: {calls - sim.log.count(method='GET', path_prefix=SEATS_PATH)}",
        ),
        Figure(
            "max calls in any window",
            sim.log.max_in_any_window(args.window),
            f"limit {args.per_window} per {args.window:g} s",
        ),
    ]
    report(
        "resync",
        figures,
        {
            "parameters": vars(args),
            "summary": summary.__dict__,
            "scaling": (
                f"{args.per_window} requests per {args.window:g} s window "
                f"(= {args.per_window * 60 / args.window:,.0f}/min) on both sides"
            ),
        },
    )


async def _count(db_url: str) -> int:
    from bench.common import scalar

    return int(await scalar(db_url, "SELECT count(*) FROM seat"))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scopes", type=int, default=2000)
    parser.add_argument("--seats", type=int, default=3)
    parser.add_argument("--per-window", type=int, default=200)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=4, help="RESYNC_CONCURRENCY")
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
