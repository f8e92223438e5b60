"""The `seat-sync` command: run the processes, sync on demand, and query the mirror."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import enum
import functools
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NoReturn, TypeVar

import structlog
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import col

from worker.config import ConfigError, Settings, load_settings
from worker.models import Seat, seat_json
from worker.platform import logs
from worker.platform.db import is_sqlite, redacted, sqlite_path
from worker.platform.migrate import SchemaBehindError, check_schema, upgrade
from worker.platform.redis import EmbeddedRedis, ping, socket_url
from worker.polar.errors import CHECK_CONFIGURATION, AuthError, PolarError, RateLimitedError
from worker.resources import Services
from worker.sync.reconcile import SeatDiff

T = TypeVar("T")

app = typer.Typer(
    name="seat-sync",
    help="Keep a local SQL mirror of Polar customer seats true, and query it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)
log = structlog.get_logger("worker.cli.app")

EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_DRIFT = 3


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    ndjson = "ndjson"


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings_or_exit() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    logs.configure(log_format=settings.log_format, level=settings.log_level)
    return settings


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning known failures into one clear line."""
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        fail(str(exc), EXIT_CONFIG)
    except SchemaBehindError as exc:
        fail(str(exc))
    except AuthError as exc:
        fail(str(exc))
    except PolarError as exc:
        fail(str(exc))
    except (OperationalError, DBAPIError) as exc:
        fail(f"database error: {str(exc.orig or exc).splitlines()[0]}")
    except OSError as exc:  # connection refused, unknown host, ...
        fail(f"cannot connect: {exc.strerror or exc}")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def resolve_redis_url(
    settings: Settings, *, start: bool
) -> tuple[str | None, EmbeddedRedis | None]:
    """REDIS_URL when set; else the private Redis (started when `start`, reused if running)."""
    if settings.redis_url is not None:
        return settings.redis_url, None
    if start:
        embedded = EmbeddedRedis(settings.data_dir)
        return await embedded.start(), embedded
    url = socket_url(settings.data_dir)
    return (url, None) if await ping(url) else (None, None)


async def prepare_database(settings: Settings) -> None:
    """The embedded SQLite default upgrades itself; other databases need `db upgrade`."""
    if is_sqlite(settings.database_url):
        await asyncio.to_thread(upgrade, settings.database_url)


async def ensure_schema(settings: Settings) -> None:
    """Before a long-running process starts: SQLite upgrades itself, others must be current."""
    await prepare_database(settings)
    services = await Services.start(settings, redis_url=None, polar=False)
    try:
        await check_schema(services.engine)
    finally:
        await services.close()


def require_database_file(settings: Settings) -> None:
    if is_sqlite(settings.database_url):
        path = sqlite_path(settings.database_url)
        if path is not None and not path.exists():
            fail(
                f"no database at {path}: run `seat-sync db upgrade` (or `seat-sync run`) to "
                "create it, or set DATABASE_URL"
            )


# --- processes ----------------------------------------------------------------------------


async def _run_until_signalled(tasks: Sequence[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run long-lived parts together until SIGTERM/SIGINT or until one of them stops;
    then stop the others. A part that failed re-raises its error."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = [asyncio.create_task(task()) for task in tasks]
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*running, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for task in [*running, waiter]:
            task.cancel()
        results = await asyncio.gather(*running, return_exceptions=True)
    if stop.is_set():
        log.info("shutdown_requested")
    for result in results:
        if isinstance(result, Exception):
            raise result


async def _worker_main(settings: Settings, *, with_web: bool, host: str, port: int) -> None:
    from worker.schedule.jobs import build_worker

    redis_url, embedded = await resolve_redis_url(settings, start=True)
    assert redis_url is not None
    try:
        await ensure_schema(settings)

        async def supervised_worker() -> None:
            await _keep_worker_running(
                lambda: build_worker(settings, redis_url, handle_signals=False)
            )

        parts: list[Callable[[], Coroutine[Any, Any, None]]] = [supervised_worker]
        if with_web:
            from worker.intake.receiver import serve

            async def web() -> None:
                await serve(
                    settings, host=host, port=port, redis_url=redis_url, handle_signals=False
                )

            parts.append(web)
        log.info(
            "seat_sync_started",
            database=redacted(settings.database_url),
            redis="embedded" if embedded else "external",
            web=f"http://{host}:{port}" if with_web else None,
        )
        await _run_until_signalled(parts)
    finally:
        if embedded is not None:
            await embedded.stop()


async def _keep_worker_running(make: Callable[[], Any], *, max_delay: float = 30.0) -> None:
    """arq's worker stops when Redis goes away: build a new one once Redis is back, rather
    than leaving the process to a supervisor's restart backoff."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    delay = 1.0
    loop = asyncio.get_running_loop()
    while True:
        worker = make()
        started = loop.time()
        try:
            await worker.async_run()
            return
        except (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError) as exc:
            if loop.time() - started > 60:
                delay = 1.0
            log.warning("worker_redis_lost", error=type(exc).__name__, retry_in=delay)
        finally:
            with contextlib.suppress(Exception):
                await worker.close()
        await asyncio.sleep(delay)
        delay = min(max_delay, delay * 2)


def default_port() -> int:
    import os

    raw = os.environ.get("PORT", "8000")
    try:
        return int(raw)
    except ValueError:
        fail(f"PORT: not a number: {raw!r}", EXIT_CONFIG)


@app.command()
def run(
    host: Annotated[
        str, typer.Option(help="Address the webhook receiver listens on.")
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="Receiver port (default: $PORT or 8000).")
    ] = None,
) -> None:
    """Run everything in one process tree: private Redis (unless REDIS_URL), worker, receiver."""
    settings = settings_or_exit()
    settings.require_token()
    settings.require_webhook_secret()
    run_async(_worker_main(settings, with_web=True, host=host, port=port or default_port()))


@app.command()
def worker() -> None:
    """Run only the queue worker (sync jobs, sweeps, cron)."""
    settings = settings_or_exit()
    settings.require_token()
    run_async(_worker_main(settings, with_web=False, host="", port=0))


@app.command()
def web(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: $PORT or 8000).")] = None,
) -> None:
    """Run only the webhook receiver."""
    settings = settings_or_exit()
    settings.require_webhook_secret()

    async def main() -> None:
        from worker.intake.receiver import serve

        await ensure_schema(settings)
        redis_url, _ = await resolve_redis_url(settings, start=False)
        await serve(settings, host=host, port=port or default_port(), redis_url=redis_url)

    run_async(main())


@app.command()
def simulator(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8900,
    token: Annotated[
        str, typer.Option(help="Access token the simulator accepts.")
    ] = "polar_oat_simulated",  # noqa: S107 - the simulator's public demo token
    webhook_url: Annotated[str | None, typer.Option(help="Deliver signed webhooks here.")] = None,
    webhook_secret: Annotated[str | None, typer.Option(envvar="POLAR_WEBHOOK_SECRET")] = None,
    legacy_webhook_secret: Annotated[
        bool,
        typer.Option(
            help="Sign as Polar does for endpoints created before 2026-09-08 (the whole "
            "secret string is the key); default: today's endpoints (base64-decoded key)."
        ),
    ] = False,
    member_model: Annotated[
        bool,
        typer.Option(
            "--member-model/--no-member-model",
            help="Simulate an organisation with Polar's member model (seats carry `email`), "
            "or without it (the address is only in `customer_email`).",
        ),
    ] = True,
    rate_limit: Annotated[int, typer.Option(help="Requests per window per organisation.")] = 500,
    rate_window: Annotated[float, typer.Option(help="Rate-limit window in seconds.")] = 60.0,
    latency: Annotated[float, typer.Option(help="Added latency per request, seconds.")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    subscriptions: Annotated[int, typer.Option(help="Seat-based subscriptions to create.")] = 0,
    orders: Annotated[int, typer.Option(help="Seat-based orders to create.")] = 0,
) -> None:
    """Run the simulated Polar API (loopback only) for demos, tests and benchmarks."""
    from worker.simulator.server import run_simulator

    logs.configure(log_format="auto")
    run_simulator(
        host,
        port,
        token=token,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        webhook_secret_kind="legacy" if legacy_webhook_secret else "standard",
        member_model=member_model,
        rate_limit=rate_limit,
        rate_window=rate_window,
        latency=latency,
        seed=seed,
        seed_subscriptions=subscriptions,
        seed_orders=orders,
    )


@app.command()
def demo(
    data_dir: Annotated[
        str, typer.Option(help="Where the demo keeps its SQLite mirror and private Redis.")
    ] = ".seat-sync-demo",
) -> None:
    """Show the whole pipeline on the embedded defaults against the simulated Polar."""
    from pathlib import Path

    from worker.process.demo import run_demo

    logs.configure(log_format="console", level="WARNING")
    if not run_async(run_demo(Path(data_dir), out)):
        fail("the mirror did not converge; see the lines marked ✗ above")


# --- sync on demand -----------------------------------------------------------------------


async def with_polar_retries(call: Callable[[], Awaitable[T]], *, attempts: int = 6) -> T:
    """For commands run by a person: wait out 429s and retry transient failures."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except RateLimitedError as exc:
            if attempt == attempts:
                raise
            err.print(f"rate limited by Polar; waiting {exc.retry_after:g}s", highlight=False)
            await asyncio.sleep(exc.retry_after)
        except PolarError as exc:
            if not exc.retryable or attempt == attempts:
                raise
            delay = min(30.0, 2.0 ** (attempt - 1))
            err.print(f"{exc}; retrying in {delay:g}s", highlight=False)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def print_changes(changes: Sequence[SeatDiff]) -> None:
    if not changes:
        out.print("no changes")
        return
    table = Table("seat", "change", "status", "holder")
    for c in changes:
        status = f"{c.old_status or '-'} -> {c.new_status or '-'}"
        holder = f"{c.old_email or '-'} -> {c.new_email or '-'}"
        table.add_row(c.seat_id, c.change, status, holder)
    out.print(table)


@contextlib.asynccontextmanager
async def operating(settings: Settings) -> AsyncIterator[Services]:
    """Services for a command that calls Polar: shares the fleet's rate budget when a Redis
    (REDIS_URL, or a running private one) is there."""
    await prepare_database(settings)
    redis_url, _ = await resolve_redis_url(settings, start=False)
    services = await Services.start(settings, redis_url=redis_url)
    try:
        await check_schema(services.engine)
        yield services
    finally:
        await services.close()


async def _resync_one(settings: Settings, kind: str, scope_id: str) -> None:
    from worker.sync import scope as sync

    async with operating(settings) as services:
        outcome = await with_polar_retries(
            lambda: sync.sync_scope(
                services, kind=kind, scope_id=scope_id, trigger="cli", lane="interactive"
            )
        )
    if outcome.status == "gone":
        fail(f"{kind} {scope_id} was not found in Polar (404); its seats stay in the mirror")
    result = outcome.result
    assert result is not None
    out.print(
        f"{kind} {scope_id}: {result.inserted} inserted, {result.updated} updated, "
        f"{result.unchanged} unchanged, {result.gone} gone "
        f"({result.total_seats} seats, {result.available_seats} available)",
        highlight=False,
    )
    print_changes(result.changes)


async def _resync_all(settings: Settings) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from worker.sync.resync import PassBusyError, resync_all

    async with operating(settings) as services:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("full resync", total=None)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            try:
                summary = await resync_all(services, trigger="cli", force=True, progress=advance)
            except PassBusyError as exc:
                fail(f"{exc}; try again when it has finished")
    assert summary is not None
    out.print(
        f"full resync {'(resumed) ' if summary.resumed else ''}#{summary.run_id}: "
        f"{summary.scopes} scopes, {summary.synced} synced, {summary.skipped} skipped "
        f"(synced by webhooks meanwhile), {summary.gone} gone, {summary.failed} failed; "
        f"{summary.api_calls} API calls, {summary.seats_changed} seats changed",
        highlight=False,
    )
    if summary.failed:
        raise typer.Exit(EXIT_ERROR)


@app.command()
def resync(
    subscription: Annotated[
        str | None, typer.Option("--subscription", help="Subscription id.")
    ] = None,
    order: Annotated[str | None, typer.Option("--order", help="Order id.")] = None,
    all_scopes: Annotated[
        bool, typer.Option("--all", help="Discover and sync every seat-based scope.")
    ] = False,
) -> None:
    """Sync one subscription or order (or --all) now and print what changed."""
    chosen = sum(x is not None for x in (subscription, order)) + int(all_scopes)
    if chosen != 1:
        fail("give exactly one of --subscription ID, --order ID or --all", EXIT_CONFIG)
    settings = settings_or_exit()
    settings.require_token()
    if all_scopes:
        run_async(_resync_all(settings))
        return
    kind, scope_id = ("subscription", subscription) if subscription else ("order", order)
    assert scope_id is not None
    run_async(_resync_one(settings, kind, scope_id))


def _print_plan(title: str, planned: Sequence[Any]) -> None:
    table = Table("seat", "scope", "recipient", "invitation expires", title=title)
    for item in planned:
        table.add_row(
            item.seat_id,
            f"{item.scope_kind} {item.scope_id}",
            item.recipient,
            _cell(item.expires_at),
        )
    out.print(table)


@app.command()
def remind(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, do not send.")] = False,
) -> None:
    """Resend invitations that expire within REMIND_WINDOW_HOURS, once per invitation."""
    settings = settings_or_exit()
    settings.require_token()

    async def main() -> None:
        from worker.schedule.invitations import remind_expiring

        async with operating(settings) as services:
            report = await remind_expiring(services, dry_run=dry_run, spread=0.0)
        verb = "would remind" if dry_run else "reminders"
        _print_plan(f"{len(report.planned)} invitations {verb}", report.planned)
        if not dry_run:
            out.print(f"outcomes: {report.outcomes or 'none'}", highlight=False)

    run_async(main())


@app.command()
def renew(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, do not act.")] = False,
) -> None:
    """Renew expired invitations (revoke + assign the same recipient again)."""
    settings = settings_or_exit()
    settings.require_token()
    if not dry_run and not settings.renew_expired_invitations:
        fail("renewal is off: set RENEW_EXPIRED_INVITATIONS=true (or use --dry-run)", EXIT_CONFIG)

    async def main() -> None:
        from worker.schedule.invitations import renew_expired

        async with operating(settings) as services:
            report = await renew_expired(services, dry_run=dry_run)
        verb = "would renew" if dry_run else "renewals"
        _print_plan(f"{len(report.planned)} expired invitations {verb}", report.planned)
        if not dry_run:
            out.print(f"outcomes: {report.outcomes or 'none'}", highlight=False)

    run_async(main())


# --- queries ------------------------------------------------------------------------------

SEAT_TABLE_COLUMNS = (
    "id",
    "status",
    "email",
    "subscription_id",
    "order_id",
    "member_id",
    "invitation_token_expires_at",
    "claimed_at",
    "revoked_at",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def emit_rows(
    rows: list[dict[str, Any]], fmt: OutputFormat, *, columns: Sequence[str], title: str
) -> None:
    """Table on a terminal; JSON (a list), NL-JSON or CSV for scripts."""
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
    elif fmt is OutputFormat.ndjson:
        for row in rows:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    elif fmt is OutputFormat.csv:
        flat = [_flatten(r) for r in rows]
        fields: list[str] = list(flat[0].keys()) if flat else list(columns)
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in flat:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    else:
        table = Table(*columns, title=title)
        for row in rows:
            table.add_row(*(_cell(row.get(c)) for c in columns))
        out.print(table)


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if key == "member":
            for mk in (
                "created_at",
                "modified_at",
                "customer_id",
                "email",
                "name",
                "external_id",
                "role",
            ):
                flat[f"member_{mk}"] = value.get(mk) if isinstance(value, dict) else None
        elif isinstance(value, dict):
            flat[key] = json.dumps(value, sort_keys=True)
        else:
            flat[key] = value
    return flat


@contextlib.asynccontextmanager
async def reading(settings: Settings) -> AsyncIterator[Services]:
    """Read-only services for the query commands (the database is opened read-only)."""
    require_database_file(settings)
    services = await Services.start(settings, redis_url=None, polar=False, read_only=True)
    try:
        await check_schema(services.engine)
        yield services
    finally:
        await services.close()


def parse_duration(text: str) -> timedelta:
    """'6h', '90m', '7d', '30s' or a plain number of hours."""
    raw = text.strip().lower()
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    try:
        if raw and raw[-1] in units:
            return timedelta(**{units[raw[-1]]: float(raw[:-1])})
        return timedelta(hours=float(raw))
    except ValueError:
        fail(f"not a duration: {text!r} (use e.g. 6h, 90m, 7d)", EXIT_CONFIG)


@app.command()
def seats(
    subscription: Annotated[str | None, typer.Option("--subscription")] = None,
    order: Annotated[str | None, typer.Option("--order")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="pending, claimed or revoked.")
    ] = None,
    email: Annotated[str | None, typer.Option("--email", help="Case-insensitive.")] = None,
    member: Annotated[str | None, typer.Option("--member", help="Member id.")] = None,
    customer: Annotated[str | None, typer.Option("--customer", help="Customer id.")] = None,
    expiring_within: Annotated[
        str | None,
        typer.Option("--expiring-within", help="Pending invitations expiring within e.g. 6h."),
    ] = None,
    expired: Annotated[
        bool, typer.Option("--expired", help="Pending invitations already expired.")
    ] = False,
    include_gone: Annotated[
        bool, typer.Option("--include-gone", help="Also seats Polar no longer lists.")
    ] = False,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="table, json, csv or ndjson.")
    ] = OutputFormat.table,
) -> None:
    """List mirrored seats (JSON: every CustomerSeat key)."""
    if status is not None and status not in ("pending", "claimed", "revoked"):
        fail("--status must be pending, claimed or revoked", EXIT_CONFIG)
    window = parse_duration(expiring_within) if expiring_within is not None else None
    settings = settings_or_exit()

    async def main() -> list[dict[str, Any]]:
        from worker.models import utcnow

        now = utcnow()
        query = select(Seat).order_by(
            col(Seat.subscription_id), col(Seat.order_id), col(Seat.created_at), col(Seat.id)
        )
        if subscription is not None:
            query = query.where(col(Seat.subscription_id) == subscription)
        if order is not None:
            query = query.where(col(Seat.order_id) == order)
        if status is not None:
            query = query.where(col(Seat.status) == status)
        if email is not None:
            query = query.where(func.lower(col(Seat.email)) == email.strip().lower())
        if member is not None:
            query = query.where(col(Seat.member_id) == member)
        if customer is not None:
            query = query.where(col(Seat.customer_id) == customer)
        if window is not None:
            query = query.where(
                col(Seat.status) == "pending",
                col(Seat.invitation_token_expires_at) > now,
                col(Seat.invitation_token_expires_at) <= now + window,
            )
        if expired:
            query = query.where(
                col(Seat.status) == "pending", col(Seat.invitation_token_expires_at) <= now
            )
        if not include_gone:
            query = query.where(col(Seat.gone_at).is_(None))
        async with reading(settings) as services, services.sessions() as session:
            found = (await session.execute(query)).scalars().all()
        return [seat_json(s) for s in found]

    rows = run_async(main())
    emit_rows(rows, fmt, columns=SEAT_TABLE_COLUMNS, title=f"{len(rows)} seats")


CHANGE_COLUMNS = (
    "observed_at",
    "seat_id",
    "change",
    "old_status",
    "new_status",
    "old_email",
    "new_email",
    "scope_kind",
    "scope_id",
)


def change_json(change: Any) -> dict[str, Any]:
    return {
        "observed_at": change.observed_at.isoformat(),
        "seat_id": change.seat_id,
        "scope_kind": change.scope_kind,
        "scope_id": change.scope_id,
        "change": change.change,
        "old_status": change.old_status,
        "new_status": change.new_status,
        "old_email": change.old_email,
        "new_email": change.new_email,
        "old_member_id": change.old_member_id,
        "new_member_id": change.new_member_id,
        "old_customer_id": change.old_customer_id,
        "new_customer_id": change.new_customer_id,
    }


@app.command("seat")
def seat_command(
    seat_id: Annotated[str, typer.Argument(help="The seat id.")],
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="table or json.")
    ] = OutputFormat.table,
) -> None:
    """One seat with its full change history."""
    from worker.models import SeatChange

    settings = settings_or_exit()

    async def main() -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        async with reading(settings) as services, services.sessions() as session:
            found = await session.get(Seat, seat_id)
            changes = (
                (
                    await session.execute(
                        select(SeatChange)
                        .where(col(SeatChange.seat_id) == seat_id)
                        .order_by(col(SeatChange.id))
                    )
                )
                .scalars()
                .all()
            )
        return (seat_json(found) if found else None), [change_json(c) for c in changes]

    found, history_rows = run_async(main())
    if found is None:
        fail(f"no seat {seat_id} in the mirror")
    if fmt is not OutputFormat.table:
        sys.stdout.write(json.dumps({"seat": found, "history": history_rows}, indent=2) + "\n")
        return
    detail = Table("key", "value", title=f"seat {seat_id}")
    for key, value in found.items():
        detail.add_row(key, _cell(value))
    out.print(detail)
    emit_rows(history_rows, OutputFormat.table, columns=CHANGE_COLUMNS, title="history")


@app.command()
def scopes(
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="table, json, csv or ndjson.")
    ] = OutputFormat.table,
) -> None:
    """Every mirrored subscription and order: seats, pending, claimed, last sync, last error."""
    from worker.models import SeatScope

    settings = settings_or_exit()

    async def main() -> list[dict[str, Any]]:
        async with reading(settings) as services, services.sessions() as session:
            found = (
                (
                    await session.execute(
                        select(SeatScope).order_by(col(SeatScope.kind), col(SeatScope.scope_id))
                    )
                )
                .scalars()
                .all()
            )
            counts: dict[tuple[str, str], dict[str, int]] = {}
            for column, kind in ((Seat.subscription_id, "subscription"), (Seat.order_id, "order")):
                rows = await session.execute(
                    select(col(column), col(Seat.status), func.count())
                    .where(col(column).is_not(None), col(Seat.gone_at).is_(None))
                    .group_by(col(column), col(Seat.status))
                )
                for scope_id, seat_status, n in rows:
                    counts.setdefault((kind, str(scope_id)), {})[seat_status] = int(n)
        return [
            {
                "kind": s.kind,
                "scope_id": s.scope_id,
                "total_seats": s.total_seats,
                "available_seats": s.available_seats,
                "pending": counts.get((s.kind, s.scope_id), {}).get("pending", 0),
                "claimed": counts.get((s.kind, s.scope_id), {}).get("claimed", 0),
                "last_synced_at": s.last_synced_at.isoformat() if s.last_synced_at else None,
                "last_error": s.last_error,
                "consecutive_failures": s.consecutive_failures,
                "gone": s.gone_at is not None,
            }
            for s in found
        ]

    rows = run_async(main())
    columns = (
        "kind",
        "scope_id",
        "total_seats",
        "available_seats",
        "pending",
        "claimed",
        "last_synced_at",
        "last_error",
    )
    emit_rows(rows, fmt, columns=columns, title=f"{len(rows)} scopes")


@app.command()
def history(
    email: Annotated[
        str | None, typer.Option("--email", help="Every seat this person held.")
    ] = None,
    lost: Annotated[
        bool, typer.Option("--lost", help="Who lost access (revoked or replaced).")
    ] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Only changes within e.g. 7d.")
    ] = None,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="table, json, csv or ndjson.")
    ] = OutputFormat.table,
) -> None:
    """Seat history from seat_change: a person's seats (--email) or who lost access (--lost)."""
    from worker.models import SeatChange, utcnow

    if email is None and not lost:
        fail("give --email E, or --lost (with --since 7d for this week)", EXIT_CONFIG)
    window = parse_duration(since) if since is not None else None
    settings = settings_or_exit()

    async def main() -> list[dict[str, Any]]:
        query = select(SeatChange).order_by(col(SeatChange.observed_at), col(SeatChange.id))
        if window is not None:
            query = query.where(col(SeatChange.observed_at) >= utcnow() - window)
        if email is not None:
            wanted = email.strip().lower()
            query = query.where(
                (func.lower(col(SeatChange.old_email)) == wanted)
                | (func.lower(col(SeatChange.new_email)) == wanted)
            )
        async with reading(settings) as services, services.sessions() as session:
            changes = (await session.execute(query)).scalars().all()
        if lost:
            return [
                {
                    "lost_at": c.observed_at.isoformat(),
                    "email": c.old_email,
                    "member_id": c.old_member_id,
                    "seat_id": c.seat_id,
                    "scope_kind": c.scope_kind,
                    "scope_id": c.scope_id,
                    "was": c.old_status,
                    "now": c.new_status,
                    "replaced_by": c.new_email,
                }
                for c in changes
                if c.old_email is not None
                and c.old_status in ("pending", "claimed")
                and (
                    c.new_status == "revoked"
                    or c.change == "gone"
                    or ((c.new_email or "").lower() != c.old_email.lower())
                )
            ]
        assert email is not None
        return _tenures(changes, email.strip().lower())

    rows = run_async(main())
    if lost:
        lost_columns = ("lost_at", "email", "was", "now", "seat_id", "scope_id", "replaced_by")
        emit_rows(rows, fmt, columns=lost_columns, title=f"{len(rows)} lost access")
    else:
        held_columns = ("seat_id", "scope_kind", "scope_id", "started_at", "ended_at", "status")
        emit_rows(rows, fmt, columns=held_columns, title=f"seats held by {email}")


def _tenures(changes: Sequence[Any], wanted: str) -> list[dict[str, Any]]:
    """Fold a person's seat_change rows into one row per seat tenure (start .. end)."""
    open_by_seat: dict[str, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    for c in changes:
        holds_now = (c.new_email or "").lower() == wanted and c.change != "gone"
        held = (c.old_email or "").lower() == wanted
        tenure = open_by_seat.get(c.seat_id)
        if holds_now and tenure is None:
            open_by_seat[c.seat_id] = {
                "seat_id": c.seat_id,
                "scope_kind": c.scope_kind,
                "scope_id": c.scope_id,
                "started_at": c.observed_at.isoformat(),
                "ended_at": None,
                "status": c.new_status,
            }
        elif holds_now and tenure is not None:
            tenure["status"] = c.new_status
        elif held and tenure is not None:
            tenure["ended_at"] = c.observed_at.isoformat()
            tenure["status"] = c.new_status if c.change != "gone" else "gone"
            done.append(open_by_seat.pop(c.seat_id))
        elif held:  # held before the history window we read
            done.append(
                {
                    "seat_id": c.seat_id,
                    "scope_kind": c.scope_kind,
                    "scope_id": c.scope_id,
                    "started_at": None,
                    "ended_at": c.observed_at.isoformat(),
                    "status": c.new_status,
                }
            )
    return sorted(done + list(open_by_seat.values()), key=lambda r: r["started_at"] or "")


@app.command()
def verify(
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="subscription:ID or order:ID (repeatable); default all."),
    ] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Fix the drift found.")] = False,
) -> None:
    """Compare the mirror with Polar scope by scope; exit 3 on drift (0 after --repair)."""
    from worker.sync.verify import mirrored_scopes, verify_scope

    chosen: list[tuple[str, str]] = []
    for item in scope or []:
        kind, sep, scope_id = item.partition(":")
        if not sep or kind not in ("subscription", "order") or not scope_id:
            fail(f"--scope must be subscription:ID or order:ID, not {item!r}", EXIT_CONFIG)
        chosen.append((kind, scope_id))
    settings = settings_or_exit()
    settings.require_token()

    async def main() -> int:
        drift = 0
        async with operating(settings) as services:
            targets = chosen or await mirrored_scopes(services)
            for kind, scope_id in targets:
                report = await with_polar_retries(
                    functools.partial(verify_scope, services, kind, scope_id, repair=repair)
                )
                for d in report.differences:
                    out.print(
                        f"{d.kind} {d.scope_id} {d.seat_id or '-'} {d.what}: {d.detail}",
                        highlight=False,
                    )
                if report.differences and not report.repaired:
                    drift += 1
            out.print(
                f"verified {len(targets)} scopes: {drift} with drift"
                + (" (repaired)" if repair else ""),
                highlight=False,
            )
        return drift

    if run_async(main()):
        raise typer.Exit(EXIT_DRIFT)


async def _status(settings: Settings) -> dict[str, Any]:
    from worker.models import (
        InvitationReminder,
        InvitationRenewal,
        SeatScope,
        SyncRun,
        utcnow,
    )
    from worker.query.inbox import pending_deliveries
    from worker.queue import QUEUE_NAME

    redis_url, _ = await resolve_redis_url(settings, start=False)
    services = await Services.start(settings, redis_url=redis_url, polar=False, read_only=True)
    try:
        await check_schema(services.engine)
        now = utcnow()
        async with services.sessions() as session:
            passes = (
                (
                    await session.execute(
                        select(SyncRun)
                        .where(col(SyncRun.kind) == "full")
                        .order_by(col(SyncRun.id).desc())
                        .limit(5)
                    )
                )
                .scalars()
                .all()
            )
            failing = (
                (
                    await session.execute(
                        select(SeatScope)
                        .where(col(SeatScope.consecutive_failures) > 0)
                        .order_by(col(SeatScope.consecutive_failures).desc())
                        .limit(20)
                    )
                )
                .scalars()
                .all()
            )
            misconfigured = (
                await session.execute(
                    select(func.count())
                    .select_from(SeatScope)
                    .where(
                        col(SeatScope.consecutive_failures) > 0,
                        col(SeatScope.last_error).contains(CHECK_CONFIGURATION, autoescape=True),
                    )
                )
            ).scalar_one()
            pending = await pending_deliveries(session)
            reminders = (
                await session.execute(
                    select(col(InvitationReminder.outcome), func.count()).group_by(
                        col(InvitationReminder.outcome)
                    )
                )
            ).all()
            renewals = (
                await session.execute(
                    select(col(InvitationRenewal.state), func.count()).group_by(
                        col(InvitationRenewal.state)
                    )
                )
            ).all()
        queue_depth: int | None = None
        budget_used: int | None = None
        if services.redis is not None and services.budget is not None:
            queue_depth = int(await services.redis.zcard(QUEUE_NAME))
            budget_used = await services.budget.used()
        oldest = pending[1]
        return {
            "polar": {
                "api_url": settings.polar_api_url,
                "api_version": settings.polar_api_version,
                "problem": _configuration_problem(settings, int(misconfigured), passes),
            },
            "full_resyncs": [
                {
                    "id": p.id,
                    "started_at": p.started_at.isoformat(),
                    "finished_at": p.finished_at.isoformat() if p.finished_at else None,
                    "status": p.status,
                    "scopes": p.scopes_seen,
                    "api_calls": p.api_calls,
                    "seats_changed": p.updated,
                    "errors": p.errors,
                }
                for p in passes
            ],
            "failing_scopes": [
                {
                    "kind": f.kind,
                    "scope_id": f.scope_id,
                    "consecutive_failures": f.consecutive_failures,
                    "last_error": f.last_error,
                }
                for f in failing
            ],
            "deliveries_pending": int(pending[0]),
            "oldest_pending_delivery_age_s": (
                round((now - oldest).total_seconds(), 1) if oldest is not None else None
            ),
            "queue_depth": queue_depth,
            "rate_budget": (
                {"used": budget_used, "limit": settings.polar_requests_per_minute}
                if budget_used is not None
                else None
            ),
            "reminders": {str(k): int(v) for k, v in reminders},
            "renewals": {str(k): int(v) for k, v in renewals},
        }
    finally:
        await services.close()


def _configuration_problem(settings: Settings, scopes: int, passes: Sequence[Any]) -> str | None:
    """What to check when Polar answers 404 without an error code (failing scopes now, or
    the last full resync stopped by it)."""
    where = [f"{scopes} scope{'' if scopes == 1 else 's'} failing"] if scopes else []
    if passes and passes[0].status == "failed" and CHECK_CONFIGURATION in (passes[0].error or ""):
        where.append(f"full resync #{passes[0].id} stopped")
    if not where:
        return None
    return (
        f"Polar answered 404 without an error code ({', '.join(where)}): check POLAR_API_URL "
        f"({settings.polar_api_url}) and POLAR_API_VERSION ({settings.polar_api_version})"
    )


@app.command()
def status(
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="table or json.")
    ] = OutputFormat.table,
) -> None:
    """Last full resyncs, failing scopes, unprocessed deliveries, queue and rate budget."""
    settings = settings_or_exit()
    require_database_file(settings)
    report = run_async(_status(settings))
    if fmt is not OutputFormat.table:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    problem = report["polar"]["problem"]
    if problem:
        out.print(problem, style="bold red", markup=False, highlight=False, soft_wrap=True)
    passes = Table(
        "pass",
        "started",
        "finished",
        "status",
        "scopes",
        "API calls",
        "changed",
        "errors",
        title="Full resyncs",
    )
    for p in report["full_resyncs"]:
        passes.add_row(
            str(p["id"]),
            p["started_at"][:19],
            (p["finished_at"] or "running")[:19],
            p["status"],
            str(p["scopes"]),
            str(p["api_calls"]),
            str(p["seats_changed"]),
            str(p["errors"]),
        )
    out.print(passes)
    if report["failing_scopes"]:
        failing = Table("scope", "failures", "last error", title="Failing scopes")
        for f in report["failing_scopes"]:
            failing.add_row(
                f"{f['kind']} {f['scope_id']}",
                str(f["consecutive_failures"]),
                f["last_error"] or "",
            )
        out.print(failing)
    budget = report["rate_budget"]
    depth = report["queue_depth"]
    used = f"{budget['used']}/{budget['limit']} in the last window" if budget else "unknown"
    out.print(
        f"deliveries not yet processed: {report['deliveries_pending']} "
        f"(oldest {report['oldest_pending_delivery_age_s']} s)\n"
        f"queue depth: {depth if depth is not None else 'Redis not reachable'}\n"
        f"rate budget: {used}\n"
        f"reminders: {report['reminders'] or 'none'}; renewals: {report['renewals'] or 'none'}",
        highlight=False,
    )


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the database at DATABASE_URL to the latest schema."""
    settings = settings_or_exit()
    try:
        upgrade(settings.database_url, revision)
    except (OperationalError, DBAPIError) as exc:
        fail(f"database error: {str(exc.orig or exc).splitlines()[0]}")
    out.print(f"database {redacted(settings.database_url)} is at {revision}", highlight=False)


def main() -> None:
    app()
