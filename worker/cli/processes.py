"""The long-running commands: `run`, `worker`, `web`, `simulator`, and the `demo`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.environment import run_async, settings_from_env
from worker.cli.errors import CommandError, UsageError
from worker.cli.output import console

commands = typer.Typer()


def default_port() -> int:
    raw = os.environ.get("PORT", "8000")
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"PORT: not a number: {raw!r}") from None


@commands.command()
def run(
    host: Annotated[
        str, typer.Option(help="Address the webhook receiver listens on.")
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="Receiver port (default: $PORT or 8000).")
    ] = None,
) -> None:
    """Run everything in one process tree: private Redis (unless REDIS_URL), worker, receiver."""
    settings = settings_from_env()
    settings.require_token()
    settings.require_webhook_secret()
    from worker.process.run import Listen, run_worker

    run_async(run_worker(settings, web=Listen(host, port or default_port())))


@commands.command()
def worker() -> None:
    """Run only the queue worker (sync jobs, sweeps, cron)."""
    settings = settings_from_env()
    settings.require_token()
    from worker.process.run import run_worker

    run_async(run_worker(settings))


@commands.command()
def web(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: $PORT or 8000).")] = None,
) -> None:
    """Run only the webhook receiver."""
    settings = settings_from_env()
    settings.require_webhook_secret()
    from worker.process.run import Listen, run_web

    run_async(run_web(settings, listen=Listen(host, port or default_port())))


@commands.command()
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
    from worker.platform import logs
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


@commands.command()
def demo(
    data_dir: Annotated[
        str, typer.Option(help="Where the demo keeps its SQLite mirror and private Redis.")
    ] = ".seat-sync-demo",
) -> None:
    """Show the whole pipeline on the embedded defaults against the simulated Polar."""
    from worker.platform import logs
    from worker.process.demo import run_demo

    logs.configure(log_format="console", level="WARNING")
    if not run_async(run_demo(Path(data_dir), console())):
        raise CommandError("the mirror did not converge; see the lines marked ✗ above")
