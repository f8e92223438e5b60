"""Webhook acks while a full resync writes: ack latency of `seat-sync web` on the embedded
SQLite default, under a steady stream of signed webhooks, while a full resync of 20
subscriptions x 1,000 seats runs against the same database file.

SQLite has one writer at a time: the receiver's insert waits while a reconcile transaction
holds the write lock, so this measures how long the resync's transactions keep webhooks
waiting. Three phases, one run: quiet (the reference), the first pass (every scope an
initial load of 1,000 seats), a second pass (every scope a no-op). The sender is its own
process (`send` below) and open-loop: each webhook's latency counts from when it was due,
so a stall delays every webhook due during it. Four processes, as deployed: `seat-sync web`,
the resync (`resync` below: `resync_all` with the worker's resources, RESYNC_CONCURRENCY
as deployed unless `--concurrency` is given: 1 on SQLite), the sender, and this one, which
hosts the simulated Polar.

Each of `--repeat` runs uses a fresh database; the figures pool their webhooks.

    .venv/bin/python -m bench.ack_during_resync [--rate 30] [--repeat 3] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from typing import Any

from bench.common import (
    PYTHON,
    REDIS_URL,
    SIM_TOKEN,
    Figure,
    database,
    free_port,
    fresh_redis,
    make_settings,
    percentile,
    report,
    scalar,
    seat_sync,
    seed_scopes,
    settings_env,
    signed_headers,
    spawn,
    stop,
    wait_port,
)
from bench.loadgen import seat_event
from worker.config import Settings
from worker.platform import logs
from worker.resources import WorkerResources
from worker.simulator.server import SimulatedPolar
from worker.sync.resync import resync_all

# ---------------------------------------------------------------------- the sender process


async def _exchange(port: int, pool: list[Any], request: bytes) -> int:
    if pool:
        reader, writer = pool.pop()
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    pool.append((reader, writer))
    return int(head.split(b" ", 2)[1])


async def send(port: int, rate: float, scopes: list[str]) -> list[list[Any]]:
    """Open loop: webhook k is due at start + k / rate, whatever the answers before it,
    until SIGTERM. Returns [due (unix time), latency from due (s), status] per webhook."""
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    pool: list[Any] = []
    samples: list[list[Any]] = []
    tasks: set[asyncio.Task[None]] = set()
    start = time.time()

    async def one(number: int, due: float) -> None:
        body = seat_event(scopes[number % len(scopes)], number)
        headers = signed_headers(str(uuid.uuid4()), body)
        lines = [
            "POST /webhooks/polar HTTP/1.1",
            f"host: 127.0.0.1:{port}",
            f"content-length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        try:
            status = await _exchange(port, pool, request)
        except (OSError, asyncio.IncompleteReadError):
            status = 0
        samples.append([due, time.time() - due, status])

    number = 0
    while not stopping.is_set():
        due = start + number / rate
        delay = due - time.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                break
        task = asyncio.create_task(one(number, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        number += 1
    await asyncio.gather(*tasks)
    for _reader, writer in pool:
        writer.close()
    return samples


def send_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.ack_during_resync send")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--scopes", required=True)
    args = parser.parse_args(argv)
    samples = asyncio.run(send(args.port, args.rate, args.scopes.split(",")))
    print(json.dumps(samples))


# ---------------------------------------------------------------------- the resync process


async def resync_passes(settings: Settings, redis_url: str, passes: int) -> list[dict[str, Any]]:
    """Full passes one after the other, as the worker's cron runs them (own process, so
    the simulated Polar does not share its event loop)."""
    logs.configure(log_format="json", level="WARNING")
    resources = await WorkerResources.create(settings, redis_url=redis_url)
    done: list[dict[str, Any]] = []
    try:
        for _ in range(passes):
            began = time.time()
            summary = await resync_all(resources, trigger="bench", force=True)
            done.append(
                {"began": began, "ended": time.time(), "summary": summary and summary.__dict__}
            )
            await asyncio.sleep(1.0)
    finally:
        await resources.aclose()
    return done


def resync_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.ack_during_resync resync")
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args(argv)
    settings = Settings()  # from the environment, as `seat-sync worker` reads it
    redis_url = os.environ["REDIS_URL"]
    print(json.dumps(asyncio.run(resync_passes(settings, redis_url, args.passes))))


# ---------------------------------------------------------------------- the benchmark


def _latencies(samples: list[list[Any]], start: float, end: float) -> list[float]:
    return [latency for due, latency, _status in samples if start <= due < end]


def _phase_figures(
    name: str, latencies: list[float], quiet: list[float], targets: bool
) -> list[Figure]:
    p99 = percentile(latencies, 99) * 1000
    worst = max(latencies, default=float("nan")) * 1000
    return [
        Figure(
            f"{name}: ack p50 / p99 (ms)",
            f"{percentile(latencies, 50) * 1000:.1f} / {p99:.1f}",
            f"quiet: {percentile(quiet, 50) * 1000:.1f} / {percentile(quiet, 99) * 1000:.1f}",
            "p99 <= 100 ms" if targets else "",
            (p99 <= 100) if targets else None,
        ),
        Figure(
            f"{name}: ack max (ms)",
            round(worst, 1),
            f"quiet: {max(quiet, default=float('nan')) * 1000:.1f}; {len(latencies)} webhooks",
            "<= 1 s" if targets else "",
            (worst <= 1000) if targets else None,
        ),
    ]


PHASES = ("quiet", "first pass", "second pass")


async def run_once(args: argparse.Namespace, sim: SimulatedPolar, scope_ids: list[str]) -> Any:
    """One run on a fresh database: quiet, then two full passes; every webhook's latency."""
    phases: dict[str, tuple[float, float]] = {}
    summaries: dict[str, Any] = {}
    async with database("sqlite", "ack") as db_url, fresh_redis(REDIS_URL) as redis_url:
        extra = {} if args.concurrency is None else {"resync_concurrency": args.concurrency}
        settings = make_settings(db_url, sim.base_url, log_level="WARNING", **extra)
        env = settings_env(settings, redis_url)
        env["RESYNC_CONCURRENCY"] = str(settings.resync_concurrency)
        port = free_port()
        web = spawn(
            seat_sync("web", "--host", "127.0.0.1", "--port", str(port)),
            env=env,
            log="ack_during_resync.web",
        )
        sender = None
        try:
            await wait_port(port, web)
            sender = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "bench.ack_during_resync",
                "send",
                "--port",
                str(port),
                "--rate",
                str(args.rate),
                "--scopes",
                ",".join(scope_ids),
                stdout=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(args.quiet)
            phases["quiet"] = (time.time() - args.quiet + 1.0, time.time())  # 1 s warm-up
            resync = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                "bench.ack_during_resync",
                "resync",
                env=env,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await resync.communicate()
            if resync.returncode != 0:
                raise RuntimeError(f"the resync process exited with {resync.returncode}")
            for name, done in zip(PHASES[1:], json.loads(out), strict=True):
                phases[name] = (done["began"], done["ended"])
                summaries[name] = done["summary"]
            sender.terminate()
            out, _ = await sender.communicate()
            samples: list[list[Any]] = json.loads(out)
        finally:
            if sender is not None and sender.returncode is None:
                sender.kill()
            stop(web)
        seats = int(await scalar(db_url, "SELECT count(*) FROM seat"))
        inbox = int(await scalar(db_url, "SELECT count(*) FROM webhook_delivery"))
    return {
        "phases": phases,
        "passes": summaries,
        "samples": samples,
        "seats": seats,
        "inbox": inbox,
        "latencies": {name: _latencies(samples, *phases[name]) for name in PHASES},
    }


async def main(args: argparse.Namespace) -> None:
    logs.configure(log_format="json", level="WARNING")
    sim = SimulatedPolar(token=SIM_TOKEN, rate_limit=1_000_000, latency=args.latency, seed=11)
    scope_ids = seed_scopes(sim.state, scopes=args.scopes, seats=args.seats)
    await sim.start()
    try:
        runs = [await run_once(args, sim, scope_ids) for _ in range(args.repeat)]
    finally:
        await sim.stop()

    pooled = {name: [x for run in runs for x in run["latencies"][name]] for name in PHASES}
    quiet = pooled["quiet"]
    figures = _phase_figures("quiet", quiet, quiet, targets=False)
    for name in PHASES[1:]:
        seconds = ", ".join(
            f"{run['phases'][name][1] - run['phases'][name][0]:.1f}" for run in runs
        )
        each = ", ".join(f"{percentile(run['latencies'][name], 99) * 1000:.0f}" for run in runs)
        figures += _phase_figures(f"{name} ({seconds} s)", pooled[name], quiet, True)
        figures.append(Figure(f"{name}: p99 of each run (ms)", each, ""))
    statuses: dict[str, int] = {}
    for run in runs:
        for _due, _latency, status in run["samples"]:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
    sent = sum(len(run["samples"]) for run in runs)
    stored = sum(run["inbox"] for run in runs)
    figures.append(
        Figure(
            "webhooks answered 202 / stored",
            f"{statuses.get('202', 0)} / {stored}",
            f"{sent} sent at {args.rate:g}/s in {len(runs)} runs; statuses {statuses}",
            "all",
            statuses.get("202", 0) == sent == stored,
        )
    )
    figures.append(
        Figure(
            "seats mirrored (each run)",
            ", ".join(str(run["seats"]) for run in runs),
            f"{args.scopes} x {args.seats} in Polar",
            "all",
            all(run["seats"] == args.scopes * args.seats for run in runs),
        )
    )
    report(
        "ack_during_resync",
        figures,
        {
            "parameters": vars(args),
            "runs": [{k: v for k, v in run.items() if k != "latencies"} for run in runs],
        },
    )


def cli() -> None:
    if sys.argv[1:2] == ["send"]:
        send_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["resync"]:
        resync_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=30.0, help="webhooks per second")
    parser.add_argument("--scopes", type=int, default=20)
    parser.add_argument("--seats", type=int, default=1000)
    parser.add_argument("--quiet", type=float, default=6.0, help="seconds before the resync")
    parser.add_argument("--latency", type=float, default=0.05, help="simulated API latency (s)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="RESYNC_CONCURRENCY (default: the deployed one)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs, each on a fresh database")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
