"""Coalescing: 1,000 signed webhooks over 50 scopes, sent within `--seconds` (1 s, and the
same spread over 8 s), each right after the seat change it reports (so Polar's list
changes during the burst). Figures: seat-list calls per scope (the most for any one
scope is the target), and whether the mirror equals Polar afterwards.

The worker coalesces per scope (`worker/queue.py`): the first change of a quiet scope
syncs at once, and the changes after it share one follow-up, started once the scope had
no change for SYNC_QUIET_SECONDS (0.5 s), never later than SYNC_MAX_WAIT_SECONDS (10 s)
after the first change it covers. A scope's burst therefore costs 2 list calls when its
webhooks arrive less than the quiet period apart and within the maximum wait.

`--order round-robin` (default) sends webhook n for scope n mod 50, so a scope's webhooks
are evenly spaced: 50 ms apart within 1 s, 400 ms apart within 8 s. `--order random`
picks each webhook's scope at random, so the gaps between one scope's webhooks vary
(over 8 s, about 29 % of them exceed 0.5 s: by the rules above, each such gap ends a
burst and the next change starts another).

    .venv/bin/python -m bench.coalescing [--seconds 1] [--order round-robin|random]
        [--webhooks 1000] [--scopes 50] [--latency 0.05] [--quiet S] [--max-wait S]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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
        quiet=args.quiet,
        max_wait=args.max_wait,
    ) as line:
        gate = asyncio.Semaphore(64)
        tasks: list[asyncio.Task[None]] = []
        sent_at: dict[str, list[float]] = {scope: [] for scope in line.scopes}
        acked_at: dict[str, list[float]] = {scope: [] for scope in line.scopes}

        async def send(scope: str, event: object) -> None:
            async with gate:
                sent_at[scope].append(time.monotonic())
                await line.post(event)  # type: ignore[arg-type]
            acked_at[scope].append(time.monotonic())

        started = time.monotonic()
        for number in range(args.webhooks):
            due = started + number * args.seconds / args.webhooks
            if (delay := due - time.monotonic()) > 0.002:
                await asyncio.sleep(delay)
            if args.order == "random":
                scope = line.scopes[line.rng.randrange(len(line.scopes))]
            else:
                scope = line.scopes[number % len(line.scopes)]
            event = line.mutate(scope)
            tasks.append(asyncio.create_task(send(scope, event)))
        last_mutation = time.monotonic()
        await asyncio.gather(*tasks)
        all_acked = time.monotonic()
        correct_at = await line.wait_correct(60)
        await line.wait_quiet()
        calls = line.list_calls()
        per_scope = line.calls_per_scope()
        final_ok = await line.mirror_correct()

    window = line.window
    per = calls / args.scopes
    worst = max(per_scope.values())
    gaps = [b - a for times in acked_at.values() for a, b in itertools.pairwise(times)]
    # When (s after the first send) each gap of one scope's webhooks >= the quiet period
    # ended: a gap that long ends the scope's burst, and the next change starts another.
    long_gaps = sorted(
        (round(b - started, 2), round(b - a, 3))
        for times in acked_at.values()
        for a, b in itertools.pairwise(times)
        if b - a >= line.window.quiet
    )
    over_quiet = sum(1 for gap in gaps if gap >= window.quiet)
    send_gaps = [b - a for times in sent_at.values() for a, b in itertools.pairwise(times)]
    sent_over_quiet = sum(1 for gap in send_gaps if gap >= window.quiet)
    spans = [times[-1] - times[0] for times in acked_at.values() if times]
    figures = [
        Figure(
            "webhooks sent / acked 202",
            f"{args.webhooks} / {line.acks.get(202, 0)}",
            f"{args.order}; sent in {last_mutation - started:.2f} s, "
            f"all acked at {all_acked - started:.2f} s",
        ),
        Figure(
            "most list calls for one scope",
            worst,
            f"quiet {window.quiet:g} s, max wait {window.max_wait:g} s",
            "<= 2",
            worst <= 2,
        ),
        Figure(
            "list calls per scope",
            round(per, 3),
            f"{calls} calls / {args.scopes} scopes; uncoalesced: {args.webhooks / args.scopes:g}",
        ),
        Figure(
            "one scope's webhooks: largest gap (s)",
            round(max(gaps, default=0.0), 3),
            f"acked: {over_quiet} of {len(gaps)} gaps >= quiet, longest span "
            f"{max(spans, default=0.0):.2f} s; sent: {sent_over_quiet} gaps >= quiet, "
            f"largest {max(send_gaps, default=0.0):.3f} s",
        ),
        Figure(
            "mirror correct after last webhook (s)",
            round(correct_at - last_mutation, 3) if correct_at else "never",
            f"the follow-ups start {window.quiet:g} s after each scope's last change",
        ),
        Figure("mirror equals Polar when quiet", str(final_ok), "", "True", final_ok),
    ]
    report(
        f"coalescing-{args.seconds:g}s" + ("-random" if args.order == "random" else ""),
        figures,
        {
            "parameters": vars(args),
            "list_calls": calls,
            "window": {"quiet_s": window.quiet, "max_wait_s": window.max_wait},
            "calls_per_scope_histogram": _histogram(per_scope.values()),
            "gaps_over_quiet_at_s": long_gaps,
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
    parser.add_argument("--order", choices=("round-robin", "random"), default="round-robin")
    parser.add_argument("--latency", type=float, default=0.05, help="simulated API latency (s)")
    parser.add_argument("--budget", type=int, default=None, help="Polar requests/min (default off)")
    parser.add_argument("--max-jobs", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=None, help="SYNC_QUIET_SECONDS (0.5)")
    parser.add_argument("--max-wait", type=float, default=None, help="SYNC_MAX_WAIT_SECONDS (10)")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
