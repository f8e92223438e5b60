"""A flood of bad requests against the public webhook port, with Polar's deliveries in it.

`seat-sync web` (its own process, real uvicorn on loopback; PostgreSQL inbox by default,
`--db sqlite` for a SQLite file) takes a flood of unsigned, wrongly signed, replayed and
tampered requests (plus GETs of `/metrics` and unknown paths) from a rate-limited load
generator in a third process (`--rate` per second for `--seconds`). Meanwhile this process
changes seats in the simulated Polar and sends each change's correctly signed webhook, each
on a new connection as Polar does (`--signed-rate` per second), timing every answer; an arq
worker here (cron off: every Polar call is a delivery's) mirrors them.

Figures: the flood's achieved rate; the signed deliveries' answers (all 2xx? p50/p99/max,
target: every one within 2 s) and the mirror afterwards; rows the flood wrote and Polar
calls it caused (both must be 0); the receiver's own count of what it refused, and the
lines it logged meanwhile.

    .venv/bin/python -m bench.flood [--rate 2000] [--seconds 30] [--signed-rate 5]
                                    [--db postgresql|sqlite]

The generator alone (what the benchmark runs as its third process):

    .venv/bin/python -m bench.flood generate 127.0.0.1:PORT --rate 2000 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import psutil
from arq.connections import create_pool
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from bench.common import (
    MIRROR_SQL,
    PYTHON,
    REDIS_URL,
    RESULTS,
    SEATS_PATH,
    SIM_TOKEN,
    WEBHOOK_SECRET,
    Figure,
    database,
    free_port,
    fresh_redis,
    make_settings,
    percentile,
    polar_view,
    report,
    seat_sync,
    seed_scopes,
    settings_env,
    signed_headers,
    spawn,
    stop,
    wait_port,
)
from bench.loadgen import seat_event
from worker import queue
from worker.platform import logs
from worker.platform.db import create_engine
from worker.schedule.jobs import build_worker
from worker.simulator.server import SimulatedPolar
from worker.simulator.state import SimState
from worker.simulator.webhooks import envelope_bytes

WEBHOOK_PATH = "/webhooks/polar"
FLOOD_SCOPE_PREFIX = "sub_flood_"
DEADLINE_S = 2.0  # Polar wants an answer within 2 s


# ---------------------------------------------------------------------- the flood generator


def flood_requests(host: str, count: int = 600) -> list[bytes]:
    """Raw HTTP/1.1 requests nobody signed with the endpoint's secret, built before the
    clock starts: the kinds cycle, every body names a flood scope."""
    wrong_secret = "whsec_" + "w" * 32
    now = int(time.time())
    made: list[bytes] = []
    for number in range(count):
        body = seat_event(f"{FLOOD_SCOPE_PREFIX}{number % 50}", number)
        webhook_id = str(uuid.uuid4())
        good = signed_headers(webhook_id, body, WEBHOOK_SECRET)
        kinds: list[tuple[str, str, bytes, dict[str, str]]] = [
            ("POST", WEBHOOK_PATH, body, {"content-type": "application/json"}),  # unsigned
            ("POST", WEBHOOK_PATH, body, signed_headers(webhook_id, body, wrong_secret)),
            ("POST", WEBHOOK_PATH, body, {**good, "webhook-signature": "v1,AAAA"}),
            ("POST", WEBHOOK_PATH, body + b" ", good),  # signed, then tampered with
            (
                "POST",
                WEBHOOK_PATH,
                body,
                {**good, "webhook-timestamp": str(now - 900)},  # a replay, 15 min late
            ),
            ("GET", "/metrics", b"", {}),
            ("GET", f"/admin/{number}", b"", {}),
        ]
        method, path, payload, headers = kinds[number % len(kinds)]
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
        if method == "POST":
            lines.append(f"content-length: {len(payload)}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        made.append(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    return made


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """(status, the server keeps the connection open)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length, keep = 0, True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    if length:
        await reader.readexactly(length)
    return status, keep


async def generate(target: str, *, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    """Open loop: request i is due at start + i / rate, on whichever keep-alive connection
    is free; a request that cannot leave on time leaves late (and counts as such)."""
    host, _, port_text = target.partition(":")
    port = int(port_text)
    requests = flood_requests(target)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    late: list[float] = []
    errors = 0
    slot = 0
    start = time.perf_counter() + 0.5
    end = start + seconds
    interval = 1.0 / rate
    last_done = start

    async def connection() -> None:
        nonlocal slot, errors, last_done
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                number, slot = slot, slot + 1
                due = start + number * interval
                if due >= end:
                    return
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                sent = time.perf_counter()
                late.append(max(0.0, sent - due))
                try:
                    status, keep = await _exchange(reader, writer, requests[number % len(requests)])
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    errors += 1
                    keep = False
                else:
                    done = time.perf_counter()
                    latencies.append(done - sent)
                    statuses[status] += 1
                    last_done = max(last_done, done)
                if not keep:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    done = len(latencies)
    wall = max(last_done - start, seconds)
    return {
        "target_rate": rate,
        "seconds": seconds,
        "connections": connections,
        "sent": done + errors,
        "answered": done,
        "errors": errors,
        "achieved_rate": done / wall,
        "wall_s": wall,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": max(latencies, default=0.0) * 1000,
        },
        "late_ms": {"p99": percentile(late, 99) * 1000, "max": max(late, default=0.0) * 1000},
    }


# ---------------------------------------------------------------------- Polar's deliveries


class Deliveries:
    """Seat changes in the simulated Polar, each followed by its signed webhook on a new
    connection; every answer timed."""

    def __init__(self, state: SimState, scopes: list[str], port: int) -> None:
        self.state = state
        self.scopes = scopes
        self.port = port
        self.rng = random.Random(14)
        self.emails = 0
        self.answers: list[tuple[int, float]] = []  # (status or 0 on error, seconds)
        self.ids: set[str] = set()

    def change(self) -> bytes:
        scope_id = self.rng.choice(self.scopes)
        seats = [self.state.seats[s] for s in self.state._containers[scope_id].seat_ids]
        pending = [s for s in seats if s["status"] == "pending"]
        claimed = [s for s in seats if s["status"] == "claimed"]
        roll = self.rng.random()
        if pending and roll < 0.4:
            self.state.claim(self.rng.choice(pending)["id"])
        elif claimed and roll < 0.7:
            self.state.revoke(self.rng.choice(claimed)["id"])
        elif self.state.available_seats(scope_id) == 0:
            self.state.revoke(self.rng.choice(claimed or pending)["id"])
        else:
            self.emails += 1
            self.state.assign(subscription_id=scope_id, email=f"s{self.emails}@bench.example")
        events = [e for e in self.state.drain_outbox() if e.type.startswith("customer_seat.")]
        return envelope_bytes(events[-1])

    async def send(self, body: bytes) -> None:
        webhook_id = str(uuid.uuid4())
        self.ids.add(webhook_id)
        headers = signed_headers(webhook_id, body, WEBHOOK_SECRET)
        lines = [f"POST {WEBHOOK_PATH} HTTP/1.1", f"host: 127.0.0.1:{self.port}"]
        lines += [f"content-length: {len(body)}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        started = time.perf_counter()
        status = 0
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            async with asyncio.timeout(10):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    status, _ = await _exchange(reader, writer, request)
                finally:
                    writer.close()
        self.answers.append((status, time.perf_counter() - started))

    async def run(self, rate: float, seconds: float) -> None:
        tasks: list[asyncio.Task[None]] = []
        started = time.monotonic()
        for number in range(int(rate * seconds)):
            if (delay := started + number / rate - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.send(self.change())))
        await asyncio.gather(*tasks)


# ---------------------------------------------------------------------- the run


async def mirror_rows(database_url: str) -> set[tuple[Any, ...]]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return {tuple(row) for row in (await conn.execute(MIRROR_SQL)).all()}
    finally:
        await engine.dispose()


async def flood_writes(database_url: str, ours: set[str]) -> dict[str, int]:
    """Rows the flood could have written: deliveries we did not send, and any row naming a
    flood scope."""
    engine = create_engine(database_url)
    like = FLOOD_SCOPE_PREFIX + "%"
    try:
        async with engine.connect() as conn:
            ids = set(
                (await conn.execute(text("SELECT webhook_id FROM webhook_delivery"))).scalars()
            )
            found = {"deliveries not sent by Polar": len(ids - ours)}
            for table, column in (
                ("webhook_delivery_scope", "scope_id"),
                ("seat_scope", "scope_id"),
                ("sync_run", "scope_id"),
                ("seat", "subscription_id"),
            ):
                query = text(f"SELECT count(*) FROM {table} WHERE {column} LIKE :like")  # noqa: S608
                found[f"{table} rows naming a flood scope"] = int(
                    (await conn.execute(query, {"like": like})).scalar_one()
                )
            return found
    finally:
        await engine.dispose()


def _compact(counts: dict[str, int]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in counts.items())


def counters(exposition: str) -> dict[str, int]:
    """The receiver's webhook counter, by outcome (and `unverified` vs verified)."""
    found: dict[str, int] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "seat_sync_webhooks_received_total":
                verified = "unverified" if sample.labels["type"] == "unverified" else "verified"
                key = f"{verified} {sample.labels['outcome']}"
                found[key] = found.get(key, 0) + int(sample.value)
    return dict(sorted(found.items()))


async def wait_mirrored(
    sim: SimulatedPolar, database_url: str, scopes: list[str], redis: Any, within: float
) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        queued = await redis.zcard(queue.QUEUE_NAME)
        if not queued and await mirror_rows(database_url) == polar_view(sim.state, scopes):
            return True
        await asyncio.sleep(0.2)
    return False


async def main(args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    worker_log = (RESULTS / "flood.worker.log").open("w")
    logs.configure(log_format="json", level="INFO", stream=worker_log)
    sim = SimulatedPolar(token=SIM_TOKEN, rate_limit=1_000_000, seed=14)
    scopes = seed_scopes(sim.state, scopes=args.scopes, seats=3, capacity=12)
    await sim.start()
    try:
        async with database(args.db, "flood") as db_url, fresh_redis(REDIS_URL) as redis_url:
            await run(args, sim, scopes, db_url, redis_url)
    finally:
        await sim.stop()
        worker_log.close()


async def run(
    args: argparse.Namespace, sim: SimulatedPolar, scopes: list[str], db_url: str, redis_url: str
) -> None:
    settings = make_settings(db_url, sim.base_url, log_level="INFO")
    port, metrics_port = free_port(), free_port()
    env = {**settings_env(settings, redis_url), "METRICS_PORT": str(metrics_port)}
    if args.web_pythonpath:  # A/B: another tree's `worker` package for the web process only
        env["PYTHONPATH"] = args.web_pythonpath
    web_log = RESULTS / "flood.web.log"
    web = spawn(
        seat_sync("web", "--host", "127.0.0.1", "--port", str(port)), env=env, log="flood.web"
    )
    worker = build_worker(settings, redis_url, handle_signals=False, cron_jobs=False)
    worker_task: asyncio.Task[Any] | None = None
    redis = await create_pool(queue.redis_settings(redis_url))
    try:
        await wait_port(port, web)
        if not args.web_pythonpath:
            await wait_port(metrics_port, web)
        worker_task = asyncio.create_task(worker.async_run())
        for scope_id in scopes:
            await queue.request_sync(redis, "subscription", scope_id)
        if not await wait_mirrored(sim, db_url, scopes, redis, 60):
            raise RuntimeError("the initial sync did not converge")
        sim.log.clear()
        log_lines_before = len(web_log.read_text().splitlines())
        load_before = os.getloadavg()
        web_cpu = psutil.Process(web.pid)
        cpu_before = sum(web_cpu.cpu_times()[:2])
        flood_started = time.monotonic()

        generator = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bench.flood",
            "generate",
            f"127.0.0.1:{port}",
            "--rate",
            str(args.rate),
            "--seconds",
            str(args.seconds),
            "--connections",
            str(args.connections),
            stdout=subprocess.PIPE,
        )
        deliveries = Deliveries(sim.state, scopes, port)
        await asyncio.sleep(1.0)  # the flood is under way
        await deliveries.run(args.signed_rate, args.seconds - 2.0)
        out, _ = await generator.communicate()
        if generator.returncode != 0:
            raise RuntimeError("the flood generator failed")
        flood = json.loads(out)
        load_after = os.getloadavg()
        cpu_share = (sum(web_cpu.cpu_times()[:2]) - cpu_before) / (time.monotonic() - flood_started)
        log_lines = len(web_log.read_text().splitlines()) - log_lines_before

        mirrored = await wait_mirrored(sim, db_url, scopes, redis, 60)
        async with httpx.AsyncClient() as client:
            exposition = ""
            with contextlib.suppress(httpx.TransportError):  # an older tree has no such port
                exposition = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        written = await flood_writes(db_url, deliveries.ids)
        flood_calls = sum(
            1
            for entry in sim.log.select(method="GET", path_prefix=SEATS_PATH)
            if str(entry.query.get("subscription_id", "")).startswith(FLOOD_SCOPE_PREFIX)
        )
        other_calls = sum(
            1
            for entry in sim.log.select()
            if not (
                entry.path.startswith(SEATS_PATH) and entry.query.get("subscription_id") in scopes
            )
        )
    finally:
        if worker_task is not None:
            worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker_task
        await worker.close()
        await redis.aclose()
        stop(web)

    times = [seconds for _, seconds in deliveries.answers]
    codes = Counter(status for status, _ in deliveries.answers)
    all_2xx = all(200 <= status < 300 for status, _ in deliveries.answers)
    within = all(seconds <= DEADLINE_S for seconds in times)
    rows = sum(written.values())
    load = f"load {load_before[0]:.2f} -> {load_after[0]:.2f}"
    figures = [
        Figure(
            "flood: achieved requests/s",
            round(flood["achieved_rate"], 1),
            f"target {args.rate}/s for {args.seconds:g} s, {args.connections} connections; {load}",
            f">= {0.95 * args.rate:,.0f}/s",
            flood["achieved_rate"] >= 0.95 * args.rate,
        ),
        Figure(
            "flood: answers",
            _compact(flood["statuses"]),
            f"p50 {flood['latency_ms']['p50']:.1f} ms, p99 {flood['latency_ms']['p99']:.1f} ms; "
            f"errors {flood['errors']}; sender late p99 {flood['late_ms']['p99']:.1f} ms",
            "4xx only",
            set(flood["statuses"]) <= {"400", "403", "404", "405", "413"},
        ),
        Figure(
            "signed deliveries answered 2xx",
            f"{sum(v for k, v in codes.items() if 200 <= k < 300)} / {len(times)}",
            _compact({str(k): v for k, v in sorted(codes.items())}),
            "all",
            all_2xx,
        ),
        Figure(
            "signed answer p50 / p99 / max (ms)",
            f"{percentile(times, 50) * 1000:.1f} / {percentile(times, 99) * 1000:.1f} / "
            f"{max(times, default=0) * 1000:.1f}",
            "new connection per delivery, as Polar",
            f"max <= {DEADLINE_S * 1000:.0f}",
            within,
        ),
        Figure(
            "mirror == Polar afterwards", str(mirrored), f"{len(scopes)} scopes", "True", mirrored
        ),
        Figure(
            "rows written by the flood",
            rows,
            "deliveries not ours; rows naming a flood scope in 4 tables",
            "0",
            rows == 0,
        ),
        Figure(
            "Polar calls caused by the flood",
            flood_calls + other_calls,
            f"naming a flood scope {flood_calls}, not for a seeded scope {other_calls}; "
            f"all calls {len(sim.log.select())}",
            "0",
            flood_calls + other_calls == 0,
        ),
        Figure(
            "receiver's count (its /metrics)",
            _compact(counters(exposition)),
            "seat_sync_webhooks_received_total",
        ),
        Figure("web log lines during the flood", log_lines, "LOG_LEVEL=INFO"),
        Figure(
            "web process CPU during the flood",
            f"{cpu_share:.0%} of one core",
            f"{os.cpu_count()} cores on the machine",
        ),
    ]
    report(
        "flood",
        figures,
        {
            "database": args.db,
            "rows_written_by_flood": written,
            "flood": flood,
            "signed": {"answers": deliveries.answers},
            "load_before": load_before,
            "load_after": load_after,
            "web_cpu_share": cpu_share,
        },
    )


def cli() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        parser = argparse.ArgumentParser(prog="bench.flood generate")
        parser.add_argument("command")
        parser.add_argument("target", help="host:port (loopback)")
        parser.add_argument("--rate", type=float, default=2000)
        parser.add_argument("--seconds", type=float, default=30)
        parser.add_argument("--connections", type=int, default=64)
        args = parser.parse_args()
        if not args.target.startswith(("127.", "localhost")):
            parser.error("loopback targets only")
        result = asyncio.run(
            generate(
                args.target, rate=args.rate, seconds=args.seconds, connections=args.connections
            )
        )
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=2000, help="flood requests per second")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--connections", type=int, default=64, help="flood keep-alive connections")
    parser.add_argument("--signed-rate", type=float, default=5, help="Polar deliveries per second")
    parser.add_argument("--scopes", type=int, default=20)
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument(
        "--web-pythonpath",
        default="",
        help="A/B: PYTHONPATH of the seat-sync web process only (e.g. a `git archive` of an\n"
        "older tree's worker/ in a temporary folder)",
    )
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
