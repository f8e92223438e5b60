"""Prometheus metrics scraped over HTTP on METRICS_PORT, and secrets kept out of logs, metrics
and tables."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tests.support.ports import free_port
from tests.support.settings import SIM_TOKEN, WEBHOOK_SECRET
from tests.support.webhooks import envelope, signed_headers
from tests.support.workers import run_worker_until_idle
from worker.config import Settings
from worker.intake.receiver import running
from worker.platform import logs
from worker.platform.db import create_engine
from worker.platform.serving import ThrottledRefresh
from worker.schedule.jobs import build_worker
from worker.simulator.server import SimulatedPolar


def samples(text_body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text_body):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_web_metrics_are_present_and_move(
    settings: Settings, sim: SimulatedPolar, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=3)
    seat = sim.state.assign(subscription_id=sub["id"], email="m@example.com")
    port = free_port()
    # A refresh interval shorter than the test's steps: every scrape reads the state afresh.
    web = settings.model_copy(update={"metrics_port": port, "metrics_refresh_seconds": 0.01})
    async with running(web, redis_url=redis_url) as hook_url:
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        before = await scrape(metrics_url)
        names = {name for name, _ in before}
        for expected in (
            "seat_sync_deliveries_pending",
            "seat_sync_oldest_pending_delivery_age_seconds",
            "seat_sync_seats",
            "seat_sync_last_full_resync_timestamp_seconds",
            "seat_sync_rate_budget_remaining",
            "seat_sync_queue_depth",
            "seat_sync_polar_rate_limited_total",
            "seat_sync_polar_misconfigured_total",
            "seat_sync_reconcile_seconds_count",
        ):
            assert expected in names, expected

        body = envelope("customer_seat.assigned", {**seat, "subscription_id": sub["id"]})
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                hook_url, content=body, headers=signed_headers(body, secret=WEBHOOK_SECRET)
            )
            assert answer.status_code == 202
            bad = await client.post(
                hook_url, content=body, headers=signed_headers(body, secret="whsec_wrong")
            )
            assert bad.status_code == 403
        queued = await scrape(metrics_url)
        assert value(queued, "seat_sync_deliveries_pending") == 1
        assert value(queued, "seat_sync_queue_depth") == 1

        await run_worker_until_idle(settings, redis_url)
        after = await scrape(metrics_url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (
        grew("seat_sync_webhooks_received_total", type="customer_seat.assigned", outcome="accepted")
        == 1
    )
    assert (
        grew("seat_sync_webhooks_received_total", type="unverified", outcome="bad_signature") == 1
    )
    assert grew("seat_sync_syncs_total", outcome="ok") >= 1
    assert grew("seat_sync_polar_requests_total", status="200") >= 1
    assert grew("seat_sync_reconcile_seconds_count") >= 1
    assert value(after, "seat_sync_deliveries_pending") == 0
    assert value(after, "seat_sync_seats", status="pending") == 1


async def test_worker_serves_metrics_on_its_port(settings: Settings, redis_url: str) -> None:
    port = free_port()
    worker = build_worker(
        settings.model_copy(update={"metrics_port": port}),
        redis_url,
        handle_signals=False,
        cron_jobs=False,
    )
    task = asyncio.create_task(worker.async_run())
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/metrics")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the worker's metrics port never answered")
        assert "seat_sync_syncs_total" in response.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()


async def test_no_secret_in_logs_metrics_or_database(
    settings: Settings, sim: SimulatedPolar, redis_url: str, database_url: str
) -> None:
    captured = io.StringIO()
    logs.configure(log_format="json", level="DEBUG", stream=captured)
    try:
        sub = sim.state.create_subscription(seats=2)
        seat = sim.state.assign(subscription_id=sub["id"], email="s@example.com")
        sim.add_fault("/v1/customer-seats", status=500, times=1)
        port = free_port()
        web = settings.model_copy(update={"metrics_port": port})
        async with running(web, redis_url=redis_url) as hook_url:
            body = envelope("customer_seat.assigned", {**seat, "subscription_id": sub["id"]})
            async with httpx.AsyncClient() as client:
                await client.post(
                    hook_url, content=body, headers=signed_headers(body, secret=WEBHOOK_SECRET)
                )
                await client.post(
                    hook_url, content=body, headers=signed_headers(body, secret="whsec_x")
                )
                exposition = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            await run_worker_until_idle(
                settings.model_copy(update={"sync_retry_base_seconds": 0.01}), redis_url
            )
    finally:
        logs.configure(log_format="json")
    engine = create_engine(database_url)
    try:
        dumped: list[Any] = []
        async with engine.connect() as conn:
            for table in ("seat", "seat_scope", "seat_change", "sync_run", "webhook_delivery"):
                dumped.extend((await conn.execute(text(f"SELECT * FROM {table}"))).all())
    finally:
        await engine.dispose()
    everything = captured.getvalue() + exposition + repr(dumped)
    assert "scope_synced" in captured.getvalue()  # the capture really saw the worker's logs
    for secret in (SIM_TOKEN, WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_")):
        assert secret not in everything


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_slow_refresh_holds_a_scrape_no_longer_than_its_wait() -> None:
    """A scrape answers with the previous values when the refresh takes too long; the
    refresh goes on, and scrapes meanwhile share it instead of starting another."""
    release = asyncio.Event()
    started = 0

    async def slow() -> None:
        nonlocal started
        started += 1
        await release.wait()

    clock = FakeClock()
    throttled = ThrottledRefresh(slow, every=15, clock=clock)
    await asyncio.wait_for(throttled(wait=0.05), 1)
    await asyncio.wait_for(throttled(wait=0.05), 1)
    assert started == 1
    release.set()
    await asyncio.wait_for(throttled(), 1)  # shares the one in flight, to its end
    assert started == 1


async def test_a_failed_refresh_waits_for_the_interval_like_any_other() -> None:
    """A database that is down is not asked again on every scrape."""
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("database down")

    clock = FakeClock()
    throttled = ThrottledRefresh(failing, every=15, clock=clock)
    await throttled()
    clock.now = 14.9
    await throttled()
    assert calls == 1
    clock.now = 15.1
    await throttled()
    assert calls == 2
