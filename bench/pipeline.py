"""The whole pipeline for the coalescing and freshness benchmarks.

The simulated Polar (this process) makes each seat change and the benchmark POSTs the
matching signed webhook to `seat-sync web` (its own process, real uvicorn on loopback,
PostgreSQL inbox); an arq worker (its own process, as in production, cron off) syncs
from the simulator through real Redis into the same database; the benchmark reads the
mirror back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis, create_pool
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from bench.common import (
    PYTHON,
    REDIS_URL,
    SEATS_PATH,
    SIM_TOKEN,
    RawPoster,
    database,
    free_port,
    fresh_redis,
    make_settings,
    polar_view,
    seat_sync,
    seed_scopes,
    settings_env,
    signed_headers,
    spawn,
    stop,
    wait_port,
)
from worker import queue
from worker.models import Seat
from worker.platform.db import create_engine
from worker.simulator.server import SimulatedPolar
from worker.simulator.state import Event
from worker.simulator.webhooks import envelope_bytes


@dataclass
class Pipeline:
    sim: SimulatedPolar
    window: queue.SyncWindow
    scopes: list[str]
    engine: AsyncEngine
    redis: ArqRedis
    webhook_url: str
    client: RawPoster
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    acks: dict[int, int] = field(default_factory=dict)
    emails: int = 0

    # ------------------------------------------------------------------ Polar side

    def mutate(self, scope_id: str) -> Event:
        """One seat change in `scope_id` (claim, revoke or assign); its seat webhook."""
        state = self.sim.state
        seats = [state.seats[s] for s in state._containers[scope_id].seat_ids]
        pending = [s for s in seats if s["status"] == "pending"]
        claimed = [s for s in seats if s["status"] == "claimed"]
        free = state.available_seats(scope_id)
        roll = self.rng.random()
        if pending and roll < 0.35:
            state.claim(self.rng.choice(pending)["id"])
        elif claimed and (roll < 0.7 or free == 0):
            state.revoke(self.rng.choice(claimed)["id"])
        elif free > 0:
            self.emails += 1
            state.assign(subscription_id=scope_id, email=f"n{self.emails}@bench.example")
        else:
            state.revoke(self.rng.choice(pending)["id"])
        events = [e for e in state.drain_outbox() if e.type.startswith("customer_seat.")]
        assert len(events) == 1, [e.type for e in events]
        return events[0]

    async def post(self, event: Event) -> int:
        body = envelope_bytes(event)
        headers = signed_headers(str(uuid.uuid4()), body)
        status = await self.client.post(body, headers)
        self.acks[status] = self.acks.get(status, 0) + 1
        return status

    def list_calls(self) -> int:
        return self.sim.log.count(method="GET", path_prefix=SEATS_PATH)

    def calls_per_scope(self) -> dict[str, int]:
        counts = dict.fromkeys(self.scopes, 0)
        for entry in self.sim.log.select(method="GET", path_prefix=SEATS_PATH):
            scope = entry.query.get("subscription_id")
            if scope in counts:
                counts[scope] += 1
        return counts

    # ------------------------------------------------------------------ mirror side

    async def mirror(self, scopes: set[str] | None = None) -> list[Any]:
        """The mirrored seats (of these subscriptions only, when given)."""
        columns = ("id", "status", "email", "member_id", "claimed_at", "revoked_at")
        query = select(*(col(getattr(Seat, c)) for c in columns)).where(col(Seat.gone_at).is_(None))
        if scopes is not None:
            query = query.where(col(Seat.subscription_id).in_(sorted(scopes)))
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def mirror_correct(self) -> bool:
        rows = {(r.id, r.status, r.email, r.member_id) for r in await self.mirror()}
        return rows == polar_view(self.sim.state, self.scopes)

    async def wait_correct(self, within: float) -> float | None:
        """Seconds (monotonic clock) at which the mirror first equals Polar, or None."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await self.mirror_correct():
                return time.monotonic()
            await asyncio.sleep(0.01)
        return None

    async def wait_quiet(self, quiet: float = 1.5, within: float = 60.0) -> None:
        """Until no list call happened for `quiet` seconds and the queue is empty."""
        deadline = time.monotonic() + within
        last, since = self.list_calls(), time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now_calls = self.list_calls()
            queued = await self.redis.zcard(queue.QUEUE_NAME)
            if now_calls != last or queued:
                last, since = now_calls, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return


@contextlib.asynccontextmanager
async def pipeline(
    *,
    scopes: int,
    seats: int,
    capacity: int,
    latency: float,
    budget: int | None,
    max_jobs: int = 10,
    quiet: float | None = None,
    max_wait: float | None = None,
) -> AsyncIterator[Pipeline]:
    """Everything started and the mirror in sync with the seeded simulator; log cleared.

    `quiet` and `max_wait` override SYNC_QUIET_SECONDS and SYNC_MAX_WAIT_SECONDS (None:
    the defaults), for the receiver and the worker alike."""
    limit = budget or 1_000_000
    sim = SimulatedPolar(token=SIM_TOKEN, rate_limit=limit, latency=latency, seed=11)
    scope_ids = seed_scopes(sim.state, scopes=scopes, seats=seats, capacity=capacity)
    await sim.start()
    try:
        async with database("postgresql", "pipeline") as db_url, fresh_redis(REDIS_URL) as r_url:
            # The deployment keeps 80% of the organisation's budget (400 of 500), as by default.
            per_minute = int(budget * 0.8) if budget else 1_000_000
            extra: dict[str, float] = {}
            if quiet is not None:
                extra["sync_quiet_seconds"] = quiet
            if max_wait is not None:
                extra["sync_max_wait_seconds"] = max_wait
            settings = make_settings(
                db_url,
                sim.base_url,
                polar_requests_per_minute=per_minute,
                log_level="INFO",
                **extra,
            )
            port = free_port()
            # Both processes coalesce with the same window.
            env = settings_env(settings, r_url) | {
                "SYNC_QUIET_SECONDS": str(settings.sync_quiet_seconds),
                "SYNC_MAX_WAIT_SECONDS": str(settings.sync_max_wait_seconds),
            }
            web = spawn(
                seat_sync("web", "--host", "127.0.0.1", "--port", str(port)),
                env=env,
                log="pipeline.web",
            )
            worker = spawn([PYTHON, "-c", _WORKER, str(max_jobs)], env=env, log="pipeline.worker")
            engine = create_engine(db_url)
            redis = await create_pool(queue.redis_settings(r_url))
            try:
                await wait_port(port, web)
                client = RawPoster(f"http://127.0.0.1:{port}/webhooks/polar", connections=32)
                try:
                    line = Pipeline(
                        sim,
                        queue.SyncWindow.of(settings),
                        scope_ids,
                        engine,
                        redis,
                        f"http://127.0.0.1:{port}/webhooks/polar",
                        client,
                    )
                    for scope_id in scope_ids:
                        await queue.request_sync(
                            redis, "subscription", scope_id, window=line.window
                        )
                    if await line.wait_correct(60) is None:
                        raise RuntimeError("the initial sync did not converge")
                    await line.wait_quiet(quiet=0.5)
                    sim.log.clear()
                    yield line
                finally:
                    await client.aclose()
            finally:
                stop(worker)
                stop(web)
                await redis.aclose()
                await engine.dispose()
    finally:
        await sim.stop()


# `seat-sync worker` with its cron jobs off: no sweep and no full pass, so every list call
# is a webhook's. Argument: max jobs.
_WORKER = """
import os, sys
from worker.config import load_settings
from worker.platform import logs
from worker.schedule.jobs import build_worker
logs.configure(log_format="json", level="INFO", stream=sys.stdout)
settings = load_settings()
build_worker(settings, os.environ["REDIS_URL"], max_jobs=int(sys.argv[1]), cron_jobs=False).run()
"""
