"""Real `seat-sync` processes for crash and concurrency tests: start them with an
environment, wait until they are ready, kill -9 them, read what they logged; and the checks
every such test makes afterwards (nothing half-written, nothing twice, mirror == Polar)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select, text
from sqlmodel import col

from tests.support.commands import SEAT_SYNC, environment
from tests.support.settings import SIM_TOKEN, WEBHOOK_SECRET
from worker.models import (
    Seat,
    SeatChange,
    SyncRun,
    WebhookDelivery,
    WebhookDeliveryScope,
    seat_json,
    utcnow,
)
from worker.platform.db import create_engine, session_factory
from worker.polar.schemas import CustomerSeat
from worker.simulator.server import SimulatedPolar

# The long profile (LONG=1) runs bigger bursts and the slow scenarios.
LONG = os.environ.get("SEAT_SYNC_LONG_TESTS", "") not in ("", "0")
START_TIMEOUT = 60.0


def process_env(
    database_url: str, redis_url: str, sim: SimulatedPolar | None, **settings: Any
) -> dict[str, str]:
    """The environment of a seat-sync process: ours replaces any POLAR_/DATABASE_/REDIS_."""
    env = environment(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        POLAR_API_URL=sim.base_url if sim is not None else "http://127.0.0.1:9",
        POLAR_ACCESS_TOKEN=SIM_TOKEN,
        POLAR_WEBHOOK_SECRET=WEBHOOK_SECRET,
        POLAR_REQUESTS_PER_MINUTE="1000000",
        POLAR_TIMEOUT_SECONDS="60",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(
        {k.upper(): str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
    )
    return env


@dataclass
class Process:
    """One seat-sync process; stdout and stderr go to one log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    _log: Any = None

    async def start(self) -> Process:
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            SEAT_SYNC,
            *self.args,
            env=self.env,
            cwd=self.log_path.parent,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        """SIGKILL now (no cleanup runs); callable from synchronous code like a hook."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)

    async def kill(self) -> None:
        self.kill9()
        await self.wait(10)

    async def stop(self, within: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                return await self.wait(within)
            except TimeoutError:
                self.kill9()
        return await self.wait(10)

    async def wait(self, within: float) -> int | None:
        assert self.proc is not None
        try:
            async with asyncio.timeout(within):
                return await self.proc.wait()
        finally:
            if self.proc.returncode is not None and self._log is not None:
                self._log.close()
                self._log = None

    async def wait_for_log(self, needle: str, within: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while needle not in self.output():
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited before logging {needle!r}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never logged {needle!r}:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class Fleet:
    """Every process a test started; all of them are gone when the test ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: list[Process] = []

    def _process(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        index = sum(1 for p in self.processes if p.name.split("#")[0] == name)
        process = Process(f"{name}#{index}", args, env, self.directory / f"{name}-{index}.log")
        self.processes.append(process)
        return process

    async def worker(self, env: dict[str, str], name: str = "worker") -> Process:
        """`seat-sync worker`, ready once its startup hook ran (cron jobs start next)."""
        process = await self._process(name, ["worker"], env).start()
        await process.wait_for_log('"worker_started"')
        return process

    async def web(self, env: dict[str, str], port: int, name: str = "web") -> Process:
        """`seat-sync web --port P`, ready once /readyz answers 200."""
        process = await self._process(name, ["web", "--port", str(port)], env).start()
        url = f"http://127.0.0.1:{port}/readyz"
        deadline = time.monotonic() + START_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(url)).status_code == 200:
                        return process
                if not process.running or time.monotonic() > deadline:
                    raise AssertionError(f"{process.name} never became ready:\n{process.tail()}")
                await asyncio.sleep(0.05)

    def command(self, env: dict[str, str], *args: str, name: str = "cli") -> Process:
        return self._process(name, list(args), env)

    async def aclose(self) -> None:
        await asyncio.gather(*(p.stop(within=10) for p in self.processes if p.running))

    def problems(self) -> list[str]:
        found: list[str] = []
        for process in self.processes:
            found += [f"{process.name}: {line}" for line in problems(process.output())]
        return found


def fleet(directory: Path) -> contextlib.aclosing[Fleet]:
    """`async with fleet(tmp_path) as procs`: every process started is stopped at the end."""
    return contextlib.aclosing(Fleet(directory))


def problems(output: str) -> list[str]:
    """Lines that must never appear: tracebacks, lock errors, and error-level log events."""
    bad: list[str] = []
    for line in output.splitlines():
        lowered = line.lower()
        if "traceback" in lowered or "database is locked" in lowered:
            bad.append(line)
            continue
        try:
            event = json.loads(line)
        except ValueError:
            if " ERROR " in line or " CRITICAL " in line:
                bad.append(line)
            continue
        if isinstance(event, dict) and event.get("level") in ("error", "critical", "exception"):
            bad.append(line)
    return bad


# ---------------------------------------------------------------------- the database


class Database:
    """The test's own view of the mirror the processes write."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.sessions = session_factory(self.engine)

    async def aclose(self) -> None:
        await self.engine.dispose()

    async def scalar(self, query: Any) -> Any:
        async with self.sessions() as session:
            return await session.scalar(query)

    async def count(self, model: Any, *where: Any) -> int:
        return int(await self.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    async def add_recent_full_pass(self) -> None:
        """A finished full resync just now: the workers' cron finds none due, so whatever
        converges in a test converged through webhooks, jobs and the inbox sweep."""
        async with self.sessions() as session, session.begin():
            now = utcnow()
            session.add(
                SyncRun(
                    kind="full",
                    trigger="cron",
                    status="ok",
                    started_at=now,
                    finished_at=now,
                    heartbeat_at=now,
                    progress=json.dumps({"discovered": True}),
                )
            )

    async def age_inbox(self, seconds: float) -> None:
        """As if the worker had been down `seconds`: the sweeper only re-requests
        deliveries older than its minimum age (10 s)."""
        delta = timedelta(seconds=seconds)
        async with self.sessions() as session, session.begin():
            for model in (WebhookDelivery, WebhookDeliveryScope):
                rows = await session.execute(select(model).where(col(model.processed_at).is_(None)))
                for row in rows.scalars():
                    row.received_at = row.received_at - delta  # type: ignore[attr-defined]

    async def in_write_transaction(self) -> bool:
        """A seat-sync process is inside a write transaction right now (it wrote or
        holds the write lock and has not committed)."""
        if self.engine.dialect.name == "postgresql":
            query = text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'seat-sync' AND backend_xid IS NOT NULL "
                "AND pid <> pg_backend_pid()"
            )
            async with self.engine.connect() as conn:
                return bool((await conn.execute(query)).scalar_one())
        import sqlite3

        path = self.url.split("///", 1)[1]
        probe = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
        return False


async def mirror_differences(db: Database, sim: SimulatedPolar) -> list[str]:
    """Every key of every seat: Polar's list for each of its scopes vs the live mirror."""
    expected: dict[str, dict[str, Any]] = {}
    for sub_id in sim.state.subscriptions:
        with contextlib.suppress(Exception):
            for s in sim.state.list_seats(subscription_id=sub_id)["seats"]:
                expected[s["id"]] = CustomerSeat.model_validate(s).model_dump(mode="json")
    for order_id in sim.state.orders:
        with contextlib.suppress(Exception):
            for s in sim.state.list_seats(order_id=order_id)["seats"]:
                expected[s["id"]] = CustomerSeat.model_validate(s).model_dump(mode="json")
    async with db.sessions() as session:
        rows = (await session.execute(select(Seat).where(col(Seat.gone_at).is_(None)))).scalars()
        got = {
            r.id: CustomerSeat.model_validate(seat_json(r)).model_dump(mode="json") for r in rows
        }
    diffs = [f"missing {i}" for i in expected.keys() - got.keys()]
    diffs += [f"extra {i}" for i in got.keys() - expected.keys()]
    diffs += [
        f"differs {i}: {k}: mirror {got[i][k]!r} polar {expected[i][k]!r}"
        for i in expected.keys() & got.keys()
        for k in expected[i]
        if got[i][k] != expected[i][k]
    ]
    return sorted(diffs)


@dataclass
class Integrity:
    """What a crash or a race could leave behind."""

    seats_without_created: list[str] = field(default_factory=list)
    created_twice: list[str] = field(default_factory=list)
    broken_chains: list[str] = field(default_factory=list)
    open_deliveries: int = 0
    open_delivery_scopes: int = 0
    unfinished_scope_runs: int = 0
    unfinished_full_runs: int = 0

    @property
    def history_ok(self) -> bool:
        return not (self.seats_without_created or self.created_twice or self.broken_chains)


async def integrity(db: Database) -> Integrity:
    """History rows agree with the seats: exactly one `created` per seat, and each change
    starts from the status the previous one ended in (a change applied twice does not)."""
    report = Integrity()
    async with db.sessions() as session:
        seat_ids = set((await session.execute(select(col(Seat.id)))).scalars())
        changes = (
            (await session.execute(select(SeatChange).order_by(col(SeatChange.id)))).scalars().all()
        )
    by_seat: dict[str, list[SeatChange]] = {}
    for change in changes:
        by_seat.setdefault(change.seat_id, []).append(change)
    for seat_id in sorted(seat_ids):
        chain = by_seat.get(seat_id, [])
        created = [c for c in chain if c.change == "created"]
        if not created:
            report.seats_without_created.append(seat_id)
        elif len(created) > 1:
            report.created_twice.append(seat_id)
        if chain and chain[0].change != "created":
            report.broken_chains.append(f"{seat_id}: starts with {chain[0].change}")
        for before, after in itertools.pairwise(chain):
            if after.change == "created" or after.old_status != before.new_status:
                report.broken_chains.append(
                    f"{seat_id}: {before.change} ->{before.new_status} then "
                    f"{after.change} {after.old_status}->{after.new_status}"
                )
    report.open_deliveries = await db.count(
        WebhookDelivery, col(WebhookDelivery.processed_at).is_(None)
    )
    report.open_delivery_scopes = await db.count(
        WebhookDeliveryScope, col(WebhookDeliveryScope.processed_at).is_(None)
    )
    report.unfinished_scope_runs = await db.count(
        SyncRun, col(SyncRun.kind) == "scope", col(SyncRun.finished_at).is_(None)
    )
    report.unfinished_full_runs = await db.count(
        SyncRun, col(SyncRun.kind) == "full", col(SyncRun.finished_at).is_(None)
    )
    return report


async def converged(db: Database, sim: SimulatedPolar) -> bool:
    """The mirror equals Polar and every delivery in the inbox was answered."""
    return not await mirror_differences(db, sim) and (await integrity(db)).open_deliveries == 0
