"""Receiver throughput: verified webhooks/s and p99 ack latency of one `seat-sync web`
process (PostgreSQL inbox + Redis), beside a bare Starlette endpoint answering 202 under
the same uvicorn settings. The load generator is a separate process (bench/loadgen.py).

    .venv/bin/python -m bench.receiver [--requests 6000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
from typing import Any

from bench.common import (
    PYTHON,
    REDIS_URL,
    Figure,
    database,
    free_port,
    fresh_redis,
    make_settings,
    report,
    scalar,
    seat_sync,
    settings_env,
    spawn,
    stop,
    wait_port,
)

SCOPES = ",".join(f"sub_bench_{n}" for n in range(50))


async def load(port: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        PYTHON,
        "-m",
        "bench.loadgen",
        f"127.0.0.1:{port}",
        "--requests",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
        "--scopes",
        SCOPES,
        "--max-seconds",
        "90",
    ]
    done = await asyncio.to_thread(
        subprocess.run,  # our own interpreter and module
        command,
        capture_output=True,
        check=True,
        timeout=180,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def main(args: argparse.Namespace) -> None:
    async with database(args.db, "receiver") as db_url, fresh_redis(REDIS_URL) as redis_url:
        settings = make_settings(db_url, "http://127.0.0.1:9", log_level=args.log_level)
        env = settings_env(settings, redis_url)

        bare_port = free_port()
        bare = spawn([PYTHON, "-m", "bench.bare", "--port", str(bare_port)], log="receiver.bare")
        try:
            await wait_port(bare_port, bare)
            reference = await load(bare_port, args)
        finally:
            stop(bare)

        port = free_port()
        web = spawn(
            seat_sync("web", "--host", "127.0.0.1", "--port", str(port)),
            env=env,
            log="receiver.web",
        )
        try:
            await wait_port(port, web)
            measured = await load(port, args)
        finally:
            stop(web)
        stored = await scalar(db_url, "SELECT count(*) FROM webhook_delivery")

    ratio = measured["rps"] / reference["rps"]
    p99 = measured["latency_ms"]["p99"]
    accepted = measured["statuses"].get("202", 0)
    figures = [
        Figure(
            "verified webhooks/s (1 process)",
            round(measured["rps"], 1),
            f"bare 202: {reference['rps']:,.1f}/s",
        ),
        Figure("ratio to bare endpoint", round(ratio, 3), "1.0", ">= 0.5", ratio >= 0.5),
        Figure(
            "p99 ack latency (ms)",
            round(p99, 2),
            f"bare: {reference['latency_ms']['p99']:.2f} ms",
            "<= 50 ms",
            p99 <= 50,
        ),
        Figure(
            "p50 ack latency (ms)",
            round(measured["latency_ms"]["p50"], 2),
            f"bare: {reference['latency_ms']['p50']:.2f} ms",
        ),
        Figure(
            "202 answers / inbox rows",
            f"{accepted} / {stored}",
            f"{measured['requests']} sent (+warm-up)",
            "all 202, all stored",
            accepted == measured["requests"] and stored >= accepted,
        ),
    ]
    report(
        "receiver",
        figures,
        {"receiver": measured, "bare": reference, "database": args.db},
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--log-level", default="INFO", help="receiver LOG_LEVEL (prod: INFO)")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
