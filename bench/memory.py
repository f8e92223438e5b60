"""Memory: peak RSS of a `seat-sync worker` process (its own process, exactly as deployed)
during a full resync of 200,000 seats (200 subscriptions x 1,000 seats), sampled every
20 ms with psutil, beside the same process's RSS when idle before the pass.

The worker's startup cron runs the first full pass; the benchmark stops it when the pass
has finished.

    .venv/bin/python -m bench.memory [--scopes 200] [--seats 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import psutil

from bench.common import (
    REDIS_URL,
    SEATS_PATH,
    SIM_TOKEN,
    Figure,
    database,
    fresh_redis,
    make_settings,
    report,
    scalar,
    seat_sync,
    seed_scopes,
    settings_env,
    spawn,
    stop,
)
from worker.simulator.server import SimulatedPolar

MB = 1024 * 1024


async def main(args: argparse.Namespace) -> None:
    sim = SimulatedPolar(token=SIM_TOKEN, rate_limit=1_000_000, latency=args.latency, seed=3)
    seeded = time.monotonic()
    seed_scopes(sim.state, scopes=args.scopes, seats=args.seats)
    seeded = time.monotonic() - seeded
    await sim.start()
    samples: list[tuple[float, int]] = []
    try:
        async with database("postgresql", "memory") as db_url, fresh_redis(REDIS_URL) as r_url:
            settings = make_settings(
                db_url, sim.base_url, resync_concurrency=args.concurrency, log_level="INFO"
            )
            worker = spawn(
                seat_sync("worker"), env=settings_env(settings, r_url), log="memory.worker"
            )
            process = psutil.Process(worker.pid)
            started = time.monotonic()
            idle_rss = 0
            finished = None
            try:
                while time.monotonic() - started < args.max_seconds:
                    if worker.poll() is not None:
                        raise RuntimeError(f"worker exited with {worker.returncode}")
                    rss = process.memory_info().rss
                    samples.append((time.monotonic() - started, rss))
                    if not sim.log.entries:
                        idle_rss = rss  # the last sample before the pass's first call
                    elif len(samples) % 25 == 0:
                        finished = await scalar(
                            db_url,
                            "SELECT finished_at FROM sync_run WHERE kind = 'full' "
                            "AND finished_at IS NOT NULL",
                        )
                        if finished is not None:
                            break
                    await asyncio.sleep(0.02)
            finally:
                stop(worker)
            seats = int(await scalar(db_url, "SELECT count(*) FROM seat"))
    finally:
        await sim.stop()

    peak = max(rss for _t, rss in samples)
    duration = samples[-1][0]
    figures = [
        Figure(
            "seats mirrored",
            f"{seats:,}",
            f"{args.scopes} x {args.seats}; pass finished: {finished is not None}",
            f"{args.scopes * args.seats:,}",
            seats == args.scopes * args.seats and finished is not None,
        ),
        Figure(
            "peak worker RSS (MB)",
            round(peak / MB, 1),
            f"idle worker: {idle_rss / MB:.1f} MB",
            "<= 250 MB",
            peak <= 250 * MB,
        ),
        Figure("growth over idle (MB)", round((peak - idle_rss) / MB, 1), ""),
        Figure(
            "seat-list calls",
            sim.log.count(method="GET", path_prefix=SEATS_PATH),
            f"pass took {duration:.1f} s (simulator seeded in {seeded:.1f} s)",
        ),
    ]
    step = max(1, len(samples) // 200)
    report(
        "memory",
        figures,
        {
            "parameters": vars(args),
            "rss_mb_timeline": [(round(t, 2), round(r / MB, 1)) for t, r in samples[::step]],
        },
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scopes", type=int, default=200)
    parser.add_argument("--seats", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=4, help="RESYNC_CONCURRENCY")
    parser.add_argument("--max-seconds", type=float, default=600)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
