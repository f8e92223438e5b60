"""Shared plumbing for the benchmarks: throwaway databases, Redis, seeding, processes, output.

Everything here stays on loopback: PostgreSQL and Redis on 127.0.0.1, the simulated Polar
on a free port. Each benchmark gets its own `pss_bench_*` database (dropped afterwards)
and Redis database 13 (flushed before and after), so test runs are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from sqlalchemy import text

from worker.config import Settings
from worker.platform.db import create_engine
from worker.platform.migrate import upgrade
from worker.simulator.state import SimState, iso
from worker.simulator.webhooks import sign

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PG_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
SIM_TOKEN = "polar_oat_bench"
WEBHOOK_SECRET = "whsec_bench_" + "b" * 32  # a legacy-generation secret (not base64)
PYTHON = sys.executable
SEATS_PATH = "/v1/customer-seats"


# ---------------------------------------------------------------------- databases


def _pg_url(database: str) -> str:
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{database}"


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def database(backend: str, tag: str) -> AsyncIterator[str]:
    """A migrated, empty database (`sqlite` file or `postgresql` pss_bench_* database)."""
    if backend == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix=f"pss_bench_{tag}_"))
        url = f"sqlite:///{folder / 'mirror.db'}"
        try:
            await asyncio.to_thread(upgrade, url)
            yield url
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}")
    name = f"pss_bench_{tag}_{uuid.uuid4().hex[:8]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        url = _pg_url(name)
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def fresh_redis(url: str = REDIS_URL) -> AsyncIterator[str]:
    """Redis database 13 (by default), flushed before and after."""
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
        yield url
    finally:
        await client.flushdb()
        await client.aclose()


def make_settings(database_url: str, api_url: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "polar_access_token": SIM_TOKEN,
        "polar_api_url": api_url,
        "polar_webhook_secret": WEBHOOK_SECRET,
        "polar_timeout_seconds": 30.0,
        "polar_requests_per_minute": 1_000_000,
        "log_format": "json",
        "log_level": "WARNING",
    }
    values.update(extra)
    return Settings(**values)


def settings_env(settings: Settings, redis_url: str) -> dict[str, str]:
    """The environment a `seat-sync` child process needs to run with `settings`."""
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": redis_url,
            "POLAR_API_URL": settings.polar_api_url,
            "POLAR_ACCESS_TOKEN": SIM_TOKEN,
            "POLAR_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "POLAR_REQUESTS_PER_MINUTE": str(settings.polar_requests_per_minute),
            "POLAR_RATE_WINDOW_SECONDS": str(settings.polar_rate_window_seconds),
            "POLAR_TIMEOUT_SECONDS": str(settings.polar_timeout_seconds),
            "RESYNC_CONCURRENCY": str(settings.resync_concurrency),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": settings.log_level,
            "DATA_DIR": str(RESULTS / ".data"),
        }
    )
    return env


async def scalar(database_url: str, sql: str) -> Any:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar()
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------- seeding the simulator


def seed_scopes(
    state: SimState,
    *,
    scopes: int,
    seats: int,
    capacity: int | None = None,
    kind: str = "subscription",
) -> list[str]:
    """Create `scopes` containers holding `seats` claimed seats each, written straight into
    the simulator's state (`assign` is O(members) per call, too slow for 200,000 seats)."""
    ids: list[str] = []
    now = state.now()
    stamp = iso(now)
    expires = iso(now + timedelta(hours=24))
    for index in range(scopes):
        total = capacity if capacity is not None else seats
        if kind == "subscription":
            container = state.create_subscription(seats=total)
        else:
            container = state.create_order(seats=total)
        scope_id = container["id"]
        box = state._containers[scope_id]
        customer = state.customers[box.customer_id]
        for number in range(seats):
            email = f"u{index}-{number}@bench.example"
            member = {
                "id": str(uuid.uuid4()),
                "created_at": stamp,
                "modified_at": None,
                "customer_id": box.customer_id,
                "email": email,
                "name": None,
                "external_id": None,
                "role": "member",
            }
            seat_id = str(uuid.uuid4())
            state.seats[seat_id] = {
                "created_at": stamp,
                "modified_at": None,
                "id": seat_id,
                "subscription_id": scope_id if kind == "subscription" else None,
                "order_id": scope_id if kind == "order" else None,
                "status": "claimed",
                "customer_id": box.customer_id,
                "member_id": member["id"],
                "member": member,
                "email": email,
                "customer_email": customer["email"],
                "invitation_token_expires_at": expires,
                "claimed_at": stamp,
                "revoked_at": None,
                "seat_metadata": {},
            }
            box.seat_ids.append(seat_id)
        ids.append(scope_id)
    state.outbox.clear()
    state.events.clear()
    return ids


def signed_headers(webhook_id: str, body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    timestamp = int(time.time())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, "legacy", webhook_id, timestamp, body),
        "content-type": "application/json",
    }


# ---------------------------------------------------------------------- mirror vs Polar


def polar_view(state: SimState, scope_ids: Iterable[str]) -> set[tuple[Any, ...]]:
    view: set[tuple[Any, ...]] = set()
    for scope_id in scope_ids:
        for seat_id in state._containers[scope_id].seat_ids:
            seat = state.seats[seat_id]
            view.add((seat["id"], seat["status"], seat["email"], seat["member_id"]))
    return view


MIRROR_SQL = text(
    "SELECT id, status, email, member_id FROM seat WHERE gone_at IS NULL"
    " AND subscription_id IS NOT NULL"
)


# ---------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_port(port: int, process: subprocess.Popen[bytes], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited with {process.returncode}")
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {within}s")


def spawn(
    args: Sequence[str], *, env: dict[str, str] | None = None, log: str
) -> subprocess.Popen[bytes]:
    """Start a child (its output goes to bench/results/<log>.log)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = (RESULTS / f"{log}.log").open("wb")
    return subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        list(args), env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
    )


def stop(process: subprocess.Popen[bytes], within: float = 10.0) -> None:
    """SIGTERM the child we started, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(within)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def seat_sync(*args: str) -> list[str]:
    """The installed `seat-sync` command, exactly as production runs it."""
    return [str(Path(PYTHON).parent / "seat-sync"), *args]


# ---------------------------------------------------------------------- figures


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[rank]


@dataclass
class Figure:
    name: str
    value: float | int | str
    reference: str
    target: str = ""
    ok: bool | None = None

    def row(self) -> list[str]:
        value = f"{self.value:,.3f}" if isinstance(self.value, float) else str(self.value)
        verdict = "" if self.ok is None else ("met" if self.ok else "MISSED")
        return [self.name, value, self.reference, self.target, verdict]


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _command() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    target = f"-m {spec.name}" if spec is not None else sys.argv[0]
    return " ".join([".venv/bin/python", target, *sys.argv[1:]])


def report(name: str, figures: list[Figure], extra: dict[str, Any] | None = None) -> Path:
    """Print the table and write bench/results/<name>.json."""
    header = ["figure", "measured", "reference (same run)", "target", ""]
    rows = [header, *(f.row() for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(f"\n== {name} ==")
    for number, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if number == 0:
            print("  ".join("-" * w for w in widths))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "name": name,
        "machine": machine(),
        "command": _command(),
        "figures": [f.__dict__ for f in figures],
        **(extra or {}),
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"-> {path.relative_to(ROOT)}")
    return path


class RawPoster:
    """POSTs over a few keep-alive loopback connections with raw asyncio streams.

    httpx's pool costs O(connections x waiting requests) CPU per request, enough to make
    the load generator, not the receiver, the bottleneck of a 1,000-webhook burst."""

    def __init__(self, url: str, connections: int = 32) -> None:
        rest = url.removeprefix("http://")
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        if not host.startswith("127."):
            raise ValueError("loopback only")
        self.host, self.port, self.path = host, int(port), "/" + path
        self.size = connections
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.opened = 0

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        if self.idle.empty() and self.opened < self.size:
            self.opened += 1
            self.idle.put_nowait(await asyncio.open_connection(self.host, self.port))
        reader, writer = await self.idle.get()
        lines = [f"POST {self.path} HTTP/1.1", f"host: {self.host}:{self.port}"]
        lines += [f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
        except BaseException:
            writer.close()
            self.opened -= 1
            raise
        self.idle.put_nowait((reader, writer))
        return status

    async def aclose(self) -> None:
        while not self.idle.empty():
            _reader, writer = self.idle.get_nowait()
            writer.close()
