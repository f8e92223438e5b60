"""A small HTTP/1.1 load generator, run as its own process (`python -m bench.loadgen`).

Raw asyncio streams with keep-alive instead of an HTTP library, so the generator costs
far less CPU than the server it measures. Every request is a distinct, freshly signed
`customer_seat.assigned` webhook (unique webhook-id, so none is a duplicate), built
before the clock starts. Prints one JSON object with throughput and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

from bench.common import WEBHOOK_SECRET, percentile, signed_headers


def seat_event(scope_id: str, number: int) -> bytes:
    """A realistic `customer_seat.assigned` envelope (about 1 KB, like Polar's)."""
    now = "2026-01-01T00:00:00Z"
    member_id = str(uuid.uuid4())
    customer_id = str(uuid.uuid4())
    email = f"load{number}@bench.example"
    data = {
        "created_at": now,
        "modified_at": now,
        "id": str(uuid.uuid4()),
        "subscription_id": scope_id,
        "order_id": None,
        "status": "pending",
        "customer_id": customer_id,
        "member_id": member_id,
        "member": {
            "id": member_id,
            "created_at": now,
            "modified_at": None,
            "customer_id": customer_id,
            "email": email,
            "name": None,
            "external_id": None,
            "role": "member",
        },
        "email": email,
        "customer_email": "billing@bench.example",
        "invitation_token_expires_at": "2026-01-02T00:00:00Z",
        "claimed_at": None,
        "revoked_at": None,
        "seat_metadata": {},
    }
    envelope = {"type": "customer_seat.assigned", "timestamp": now, "data": data}
    return json.dumps(envelope, separators=(",", ":")).encode()


def build_requests(host: str, path: str, count: int, scopes: list[str]) -> list[bytes]:
    requests = []
    for number in range(count):
        body = seat_event(scopes[number % len(scopes)], number)
        headers = signed_headers(str(uuid.uuid4()), body, WEBHOOK_SECRET)
        lines = [f"POST {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        requests.append(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return requests


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def run(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.target.partition(":")
    requests = build_requests(args.target, args.path, args.requests, args.scopes.split(","))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    cursor = iter(requests)
    deadline = time.monotonic() + args.max_seconds

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for request in cursor:
                if time.monotonic() > deadline:
                    return
                started = time.perf_counter()
                try:
                    status = await _exchange(reader, writer, request)
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    # Warm-up: a few requests so connection set-up and first-request costs are not timed.
    warm = [next(cursor) for _ in range(min(args.warmup, len(requests)))]
    reader, writer = await asyncio.open_connection(host, int(port))
    for request in warm:
        await _exchange(reader, writer, request)
    writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(args.concurrency)))
    wall = time.perf_counter() - started
    done = len(latencies)
    return {
        "requests": done,
        "wall_s": wall,
        "rps": done / wall if wall else 0.0,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
        "concurrency": args.concurrency,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p90": percentile(latencies, 90) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": max(latencies, default=0.0) * 1000,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", help="host:port (loopback)")
    parser.add_argument("--path", default="/webhooks/polar")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--scopes", default="sub_bench_0")
    args = parser.parse_args()
    if not args.target.startswith(("127.", "localhost")):
        parser.error("loopback targets only")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
