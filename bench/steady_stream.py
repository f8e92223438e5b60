"""A steady stream on one scope: a seat change (and its signed webhook) every 100 ms for
60 s, with a 50 ms simulated API latency. Figures: seat-list calls for the scope, and the
staleness of each change (sending its webhook -> queryable in the mirror; a poller reads
the scope's seats every 10 ms).

The scope is never quiet for SYNC_QUIET_SECONDS, so after the leading sync each follow-up
starts SYNC_MAX_WAIT_SECONDS after the first change it covers (`worker/queue.py`): the
stream costs at most 1 + duration / SYNC_MAX_WAIT_SECONDS list calls, and no change waits
much longer than the maximum wait plus one sync.

    .venv/bin/python -m bench.steady_stream [--seconds 60] [--interval 0.1]
                                            [--latency 0.05] [--quiet S] [--max-wait S]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

from bench.common import SEATS_PATH, Figure, percentile, report
from bench.freshness import Tracker, poll
from bench.pipeline import pipeline
from worker.simulator.state import Event


async def main(args: argparse.Namespace) -> None:
    tracker = Tracker()
    async with pipeline(
        scopes=1,
        seats=10,
        capacity=30,
        latency=args.latency,
        budget=None,
        quiet=args.quiet,
        max_wait=args.max_wait,
    ) as line:
        stop = asyncio.Event()
        poller = asyncio.create_task(poll(line, tracker, stop))
        tasks: list[asyncio.Task[None]] = []
        sent_at: list[float] = []
        acked_at: list[float] = []

        async def send(event: Event) -> None:
            await line.post(event)
            acked_at.append(time.monotonic())

        total = round(args.seconds / args.interval)
        started = time.monotonic()
        for number in range(total):
            due = started + number * args.interval
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            event = line.mutate(line.scopes[0])
            sent_at.append(time.monotonic())
            tracker.expect(event.data, sent_at[-1])
            tasks.append(asyncio.create_task(send(event)))
        sent_for = time.monotonic() - started
        await asyncio.gather(*tasks)
        for _ in range(round((2 * line.window.max_wait + 30) / 0.05)):  # the last follow-up
            if all(e.seen_at is not None for e in tracker.all()):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await poller
        await line.wait_quiet()
        calls = line.list_calls()
        call_times = sorted(e.at for e in line.sim.log.select("GET", SEATS_PATH))
        final_ok = await line.mirror_correct()

    window = line.window
    expected = tracker.all()
    lags = [e.seen_at - e.sent_at for e in expected if e.seen_at is not None]
    missing = len(expected) - len(lags)
    p50, p99 = percentile(lags, 50), percentile(lags, 99)
    bound = 1 + args.seconds / window.max_wait
    offsets = [round(t - call_times[0], 2) for t in call_times]
    # A gap of a quiet period in the stream ends it: the next change starts another burst.
    long_gaps = {
        what: [
            (round(b - started, 2), round(b - a, 3))
            for a, b in itertools.pairwise(sorted(times))
            if b - a >= window.quiet
        ]
        for what, times in (("sent", sent_at), ("acked", acked_at))
    }
    figures = [
        Figure(
            "changes sent",
            f"{len(expected)} in {sent_for:.1f} s",
            f"one scope, one every {args.interval * 1000:g} ms",
        ),
        Figure(
            "list calls for the scope",
            calls,
            f"quiet {window.quiet:g} s, max wait {window.max_wait:g} s; "
            f"uncoalesced: {len(expected)}",
            f"<= {bound:g}",
            calls <= bound,
        ),
        Figure(
            "staleness p99 (s)",
            round(p99, 3),
            f"p50 {p50:.3f} s, max {max(lags, default=0.0):.3f} s",
            f"<= {window.max_wait + 1:g} s",
            p99 <= window.max_wait + 1,
        ),
        Figure(
            "gaps >= the quiet period in the stream",
            f"sent {len(long_gaps['sent'])}, acked {len(long_gaps['acked'])}",
            "each one splits the stream (a leading edge after it)",
        ),
        Figure("changes never seen", missing, "", "0", missing == 0),
        Figure("mirror equals Polar when quiet", str(final_ok), "", "True", final_ok),
    ]
    report(
        "steady_stream",
        figures,
        {
            "parameters": vars(args),
            "window": {"quiet_s": window.quiet, "max_wait_s": window.max_wait},
            "list_calls_at_s": offsets,
            "gaps_over_quiet_at_s": long_gaps,
            "p50_s": p50,
        },
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.1, help="between two changes (s)")
    parser.add_argument("--latency", type=float, default=0.05, help="simulated API latency (s)")
    parser.add_argument("--quiet", type=float, default=None, help="SYNC_QUIET_SECONDS (0.5)")
    parser.add_argument("--max-wait", type=float, default=None, help="SYNC_MAX_WAIT_SECONDS (10)")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
