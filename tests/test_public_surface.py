"""Only what Polar needs is public.

The webhook port answers `POST /webhooks/polar`, `GET /healthz` and `GET /readyz`, and 404
to anything else; `/metrics` lives on METRICS_PORT (loopback unless METRICS_HOST says
otherwise), shows no secret, and costs one round of queries per METRICS_REFRESH_SECONDS
however often it is scraped; a flood of unsigned or wrongly signed requests writes nothing,
queues nothing and makes no Polar call, while Polar's own deliveries keep being answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis.asyncio as aioredis
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from tests.support.commands import env_for, seat_sync
from tests.support.polar_signing import polar_headers
from tests.support.ports import free_port
from tests.support.processes import Database, fleet, mirror_differences, process_env
from tests.support.settings import SIM_TOKEN, WEBHOOK_SECRET
from tests.support.waiting import eventually
from tests.support.workers import run_worker_until_idle
from worker.config import Settings
from worker.intake.receiver import WEBHOOK_PATH, running
from worker.platform import logs
from worker.platform.db import create_engine, session_factory
from worker.query import gauges
from worker.simulator.server import SimulatedPolar

SECRETS = (SIM_TOKEN, WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"))


def seat_envelope(seat: dict[str, Any]) -> bytes:
    body = {"type": "customer_seat.assigned", "timestamp": "2026-01-01T00:00:00Z", "data": seat}
    return json.dumps(body, separators=(",", ":")).encode()


def signed(body: bytes, **kwargs: Any) -> dict[str, str]:
    """Headers as Polar sends them (the endpoint's secret, today's key)."""
    return polar_headers(WEBHOOK_SECRET, "standard", body, **kwargs)


@contextlib.contextmanager
def counted_statements() -> Iterator[list[str]]:
    """Every SQL statement any engine of this process sends while inside."""
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(Engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", count)


# ---------------------------------------------------------------------- the two ports


async def test_the_webhook_port_serves_only_what_polar_needs(
    database_url: str, redis_url: str, sim: SimulatedPolar, tmp_path: Path
) -> None:
    """A real `seat-sync web`: the three public routes as they were, 404 for the rest
    (`/metrics` included); `/metrics` on METRICS_PORT, bound to loopback, with no secret."""
    sub = sim.state.create_subscription(seats=2)
    seat = sim.state.assign(subscription_id=sub["id"], email="p@example.com")
    port, metrics_port = free_port(), free_port()
    env = process_env(database_url, redis_url, sim, metrics_port=metrics_port)
    public = f"http://127.0.0.1:{port}"
    private = f"http://127.0.0.1:{metrics_port}"
    async with fleet(tmp_path) as procs, httpx.AsyncClient(timeout=10) as client:
        web = await procs.web(env, port)

        health = await client.get(public + "/healthz")
        ready = await client.get(public + "/readyz")
        body = seat_envelope({**seat, "subscription_id": sub["id"]})
        accepted = await client.post(public + WEBHOOK_PATH, content=body, headers=signed(body))
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")
        assert accepted.status_code == 202
        for path in ("/metrics", "/metrics/", "/", "/docs", "/webhooks", "/healthz/x"):
            assert (await client.get(public + path)).status_code == 404, path
        assert (await client.post(public + "/metrics")).status_code == 404

        scraped = await client.get(private + "/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        assert 'seat_sync_webhooks_received_total{outcome="accepted"' in scraped.text
        assert "seat_sync_seats" in scraped.text
        assert "seat_sync_deliveries_pending 1.0" in scraped.text
        for secret in SECRETS:
            assert secret not in scraped.text
        # The metrics port serves metrics and nothing else.
        assert (await client.post(private + WEBHOOK_PATH, content=body)).status_code == 404
        assert (await client.get(private + "/healthz")).status_code == 404

        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process(web.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert ("127.0.0.1", metrics_port) in listening, listening
    assert procs.problems() == []


async def test_seat_sync_run_serves_one_metrics_port_for_worker_and_receiver(
    database_url: str, redis_url: str, sim: SimulatedPolar, tmp_path: Path
) -> None:
    """`seat-sync run` holds the worker and the receiver in one process: one metrics server
    on METRICS_PORT shows both, and nothing else tries to bind it."""
    sub = sim.state.create_subscription(seats=2)
    seat = sim.state.assign(subscription_id=sub["id"], email="r@example.com")
    port, metrics_port = free_port(), free_port()
    env = process_env(database_url, redis_url, sim, metrics_port=metrics_port)
    public = f"http://127.0.0.1:{port}"
    async with fleet(tmp_path) as procs, httpx.AsyncClient(timeout=10) as client:
        run = await procs.command(env, "run", "--port", str(port), name="run").start()
        await run.wait_for_log('"worker_started"')

        async def answers() -> bool:
            with contextlib.suppress(httpx.TransportError):
                return (await client.get(public + "/readyz")).status_code == 200
            return False

        await eventually(answers, within=30, what="seat-sync run's receiver is ready")
        body = seat_envelope({**seat, "subscription_id": sub["id"]})
        assert (
            await client.post(public + WEBHOOK_PATH, content=body, headers=signed(body))
        ).status_code == 202
        assert (await client.get(public + "/metrics")).status_code == 404

        async def synced() -> bool:
            text_body = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            return 'seat_sync_syncs_total{outcome="ok"}' in text_body

        await eventually(synced, within=30, what="the worker's sync counted on the one port")
        scraped = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert 'seat_sync_webhooks_received_total{outcome="accepted"' in scraped
        assert run.running
    assert procs.problems() == []
    assert "address already in use" not in run.output().lower()


async def test_a_metrics_port_in_use_stops_seat_sync_web_with_one_line(
    database_url: str, redis_url: str, sim: SimulatedPolar
) -> None:
    """Before it takes a webhook: the port is bound first, and the failure names the
    setting (exit 2, a bad setting)."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        env = env_for(
            database_url,
            sim,
            redis_url,
            POLAR_WEBHOOK_SECRET=WEBHOOK_SECRET,
            METRICS_PORT=str(metrics_port),
        )
        ran = await seat_sync("web", "--port", str(port), env=env)
    assert ran.code == 2, ran
    assert ran.err.strip().splitlines() == [
        f"error: METRICS_PORT: cannot listen on 127.0.0.1:{metrics_port}: Address already in use"
    ]
    assert "Traceback" not in ran.out + ran.err


# ---------------------------------------------------------------------- scrape cost


async def one_round_of_gauge_queries(settings: Settings) -> int:
    """How many statements one refresh of the gauges sends (a fresh engine, as the web
    process starts with)."""
    engine = create_engine(settings.database_url)
    try:
        with counted_statements() as statements:
            await gauges.refresh(session_factory(engine))
    finally:
        await engine.dispose()
    return len(statements)


async def test_scrapes_within_one_refresh_interval_cost_one_round_of_queries(
    settings: Settings, redis_url: str
) -> None:
    """60 scrapes, 30 of them at once, within one METRICS_REFRESH_SECONDS: the database
    sees the statements of one refresh, not 60."""
    per_round = await one_round_of_gauge_queries(settings)
    assert per_round >= 3
    port = free_port()
    web = settings.model_copy(update={"metrics_port": port, "metrics_refresh_seconds": 600})
    url = f"http://127.0.0.1:{port}/metrics"
    async with running(web, redis_url=redis_url), httpx.AsyncClient(timeout=10) as client:
        with counted_statements() as statements:
            at_once = await asyncio.gather(*(client.get(url) for _ in range(30)))
            one_by_one = [await client.get(url) for _ in range(30)]
    assert {r.status_code for r in [*at_once, *one_by_one]} == {200}
    assert len(statements) == per_round, statements


async def test_a_scrape_after_the_interval_refreshes_again(
    settings: Settings, redis_url: str
) -> None:
    per_round = await one_round_of_gauge_queries(settings)
    port = free_port()
    web = settings.model_copy(update={"metrics_port": port, "metrics_refresh_seconds": 0.3})
    url = f"http://127.0.0.1:{port}/metrics"
    async with running(web, redis_url=redis_url), httpx.AsyncClient(timeout=10) as client:
        with counted_statements() as statements:
            assert (await client.get(url)).status_code == 200
            assert (await client.get(url)).status_code == 200
            await asyncio.sleep(0.4)
            assert (await client.get(url)).status_code == 200
    assert len(statements) == 2 * per_round


# ---------------------------------------------------------------------- a flood


def flood_requests(base: str, scope_id: str) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(method, url, body, headers): every kind of request anyone can send, none signed
    with the endpoint's secret for now; each names `scope_id`."""
    hook = base + WEBHOOK_PATH
    now = int(time.time())
    made: list[tuple[str, str, bytes, dict[str, str]]] = []
    for number in range(20):
        body = seat_envelope({"id": str(uuid.uuid4()), "subscription_id": scope_id, "n": number})
        good = signed(body)
        made += [
            ("POST", hook, body, {}),
            ("POST", hook, body, {"content-type": "application/json"}),
            ("POST", hook, body, polar_headers("whsec_d3Jvbmc=", "standard", body)),
            ("POST", hook, body, signed(body, timestamp=now - 600)),  # a replay
            ("POST", hook, body, signed(body, timestamp=now + 600)),
            ("POST", hook, body, {**good, "webhook-timestamp": "soon"}),
            ("POST", hook, body, {**good, "webhook-signature": "v1,AAAA"}),
            ("POST", hook, body, {**good, "webhook-id": "x" * 300}),
            ("POST", hook, body + b" ", good),  # signed, then tampered with
            ("GET", base + "/metrics", b"", {}),
        ]
    return made


async def table_rows(database_url: str) -> dict[str, int]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return {
                table.name: int(
                    (await conn.execute(select(func.count()).select_from(table))).scalar_one()
                )
                for table in SQLModel.metadata.sorted_tables
            }
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def captured_logs() -> AsyncIterator[io.StringIO]:
    captured = io.StringIO()
    logs.configure(log_format="json", level="INFO", stream=captured)
    try:
        yield captured
    finally:
        logs.configure(log_format="json")


async def send_all(
    client: httpx.AsyncClient, requests: list[tuple[str, str, bytes, dict[str, str]]]
) -> list[int]:
    gate = asyncio.Semaphore(20)

    async def one(method: str, url: str, body: bytes, headers: dict[str, str]) -> int:
        async with gate:
            return (await client.request(method, url, content=body, headers=headers)).status_code

    return await asyncio.gather(*(one(*request) for request in requests))


async def test_a_flood_of_bad_requests_writes_nothing_and_calls_polar_never(
    settings: Settings, redis_url: str, sim: SimulatedPolar, database_url: str
) -> None:
    """200 unsigned, wrongly signed, replayed and tampered requests: no statement reaches
    the database, no key Redis, no call Polar, and they are not logged one by one. Polar's
    own deliveries sent in the middle of a second flood are answered and mirrored."""
    flood_scope = "sub_flood_" + uuid.uuid4().hex
    subs = [sim.state.create_subscription(seats=2) for _ in range(3)]
    seats = [
        sim.state.assign(subscription_id=s["id"], email=f"f{i}@e.com") for i, s in enumerate(subs)
    ]
    before = await table_rows(database_url)
    redis = aioredis.Redis.from_url(redis_url)
    async with (
        captured_logs() as captured,
        running(settings, redis_url=redis_url) as hook_url,
        httpx.AsyncClient(timeout=10) as client,
    ):
        base = hook_url.removesuffix(WEBHOOK_PATH)
        with counted_statements() as statements:
            codes = await send_all(client, flood_requests(base, flood_scope))
        keys = await redis.dbsize()
        after_flood = await table_rows(database_url)

        deliveries = []
        for seat, sub in zip(seats, subs, strict=True):
            body = seat_envelope({**seat, "subscription_id": sub["id"]})
            deliveries.append(("POST", hook_url, body, signed(body)))
        mixed = flood_requests(base, flood_scope)
        mixed[50:50] = deliveries[:1]
        mixed[100:100] = deliveries[1:2]
        mixed[150:150] = deliveries[2:]
        answered = await send_all(client, mixed)
    await redis.aclose()

    assert len(codes) == 200 and set(codes) <= {400, 403, 404}, sorted(set(codes))
    assert statements == []
    assert keys == 0
    assert after_flood == before
    warned = [line for line in captured.getvalue().splitlines() if "webhook_rejected" in line]
    assert len(warned) <= 2, warned  # one per 10 s, not one per request

    assert [answered[50], answered[100], answered[150]] == [202, 202, 202]
    assert sorted(set(answered) - {202}) == sorted(set(codes))
    await run_worker_until_idle(settings, redis_url)
    called = {entry.query.get("subscription_id") for entry in sim.log.select()}
    assert called == {s["id"] for s in subs}
    after = await table_rows(database_url)
    assert after["webhook_delivery"] == before["webhook_delivery"] + 3
    async with contextlib.aclosing(Database(database_url)) as db:
        assert await mirror_differences(db, sim) == []
        flood_rows = await db.scalar(
            text("SELECT count(*) FROM webhook_delivery_scope WHERE scope_id = :s").bindparams(
                s=flood_scope
            )
        )
    assert flood_rows == 0
