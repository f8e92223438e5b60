"""Cold read commands on a 10,000-seat SQLite mirror, beside plain Python + sqlite3.

Builds a migrated SQLite mirror (2,000 subscriptions x 5 seats, ~3 history rows per seat,
scope and full sync runs, processed webhook deliveries, reminders), then runs each read
command as a person does, a new `seat-sync` process every time, and times the whole
process (wall clock, from spawn to exit). Beside each: `python -c` with the standard
library's sqlite3 running the same rows' SQL and printing them as JSON, the floor for a
Python program answering the same question. And `python -c pass`: the interpreter alone.

    .venv/bin/python -m bench.cli_cold [--runs 9] [--keep DIR]

`python -X importtime` on one command shows what is left to load:

    DATABASE_URL=sqlite:///DIR/mirror.db .venv/bin/python -X importtime \\
        .venv/bin/seat-sync seats --email user42@example.com --format json 2>&1 >/dev/null \\
        | sort -t'|' -k2 -n | tail
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert

from bench.common import PYTHON, REDIS_URL, Figure, report, seat_sync
from worker.models import (
    InvitationReminder,
    Seat,
    SeatChange,
    SeatScope,
    SyncRun,
    WebhookDelivery,
)
from worker.platform.migrate import upgrade

TARGET_MS = 250.0
SUBSCRIPTIONS = 2_000
SEATS_EACH = 5
NOW = datetime.now(UTC)


def _seat(n: int, sub_id: str, rng: random.Random) -> dict[str, Any]:
    status = rng.choices(("claimed", "pending", "revoked"), weights=(60, 25, 15))[0]
    member_model = n % 2 == 0
    email = f"user{n}@example.com" if status != "revoked" else None
    created = NOW - timedelta(days=rng.uniform(1, 60))
    member = member_model and email is not None
    return {
        "id": f"{n:08x}-5eat-4000-8000-{rng.getrandbits(48):012x}",
        "created_at": created,
        "modified_at": created + timedelta(hours=1),
        "subscription_id": sub_id,
        "order_id": None,
        "status": status,
        "customer_id": f"cus_{n}" if email else None,
        "member_id": f"mem_{n}" if member else None,
        "email": email if member else None,
        "customer_email": email,
        "invitation_token_expires_at": created + timedelta(hours=24),
        "claimed_at": created + timedelta(hours=2) if status == "claimed" else None,
        "revoked_at": created + timedelta(days=1) if status == "revoked" else None,
        "seat_metadata": {"team": f"t{n % 7}"},
        "member_created_at": created if member else None,
        "member_modified_at": None,
        "member_customer_id": f"cus_{n}" if member else None,
        "member_email": email if member else None,
        "member_name": f"User {n}" if member else None,
        "member_external_id": None,
        "member_role": "member" if member else None,
        "gone_at": None,
        "synced_at": NOW,
    }


def build_mirror(path: Path) -> dict[str, Any]:
    """A migrated mirror of 10,000 seats; returns what the timed commands ask about."""
    url = f"sqlite:///{path}"
    upgrade(url)
    rng = random.Random(13)
    subs = [f"{i:08x}-50b0-4000-8000-{rng.getrandbits(48):012x}" for i in range(SUBSCRIPTIONS)]
    seats = [_seat(n, subs[n // SEATS_EACH], rng) for n in range(SUBSCRIPTIONS * SEATS_EACH)]
    changes: list[dict[str, Any]] = []
    for s in seats:
        base = {
            "seat_id": s["id"],
            "scope_kind": "subscription",
            "scope_id": s["subscription_id"],
            "sync_run_id": None,
            "polar_modified_at": None,
        }
        holder = s["customer_email"] or f"gone{len(changes)}@example.com"
        changes.append(
            {
                **base,
                "observed_at": s["created_at"],
                "change": "created",
                "old_status": None,
                "new_status": "pending",
                "old_email": None,
                "new_email": holder,
            }
        )
        if s["status"] != "pending":
            changes.append(
                {
                    **base,
                    "observed_at": s["created_at"] + timedelta(hours=2),
                    "change": "status",
                    "old_status": "pending",
                    "new_status": "claimed",
                    "old_email": holder,
                    "new_email": holder,
                }
            )
        if s["status"] == "revoked":
            changes.append(
                {
                    **base,
                    "observed_at": min(NOW, s["created_at"] + timedelta(days=1)),
                    "change": "status",
                    "old_status": "claimed",
                    "new_status": "revoked",
                    "old_email": holder,
                    "new_email": None,
                }
            )
    changes.sort(key=lambda c: c["observed_at"])
    scopes = [
        {
            "kind": "subscription",
            "scope_id": sub,
            "total_seats": SEATS_EACH,
            "available_seats": 1,
            "created_at": NOW - timedelta(days=60),
            "last_synced_at": NOW - timedelta(minutes=rng.uniform(1, 300)),
            "last_fetch_started_at": NOW - timedelta(minutes=5),
            "consecutive_failures": 0,
        }
        for sub in subs
    ]
    runs = [
        {
            "kind": "scope",
            "trigger": "webhook",
            "scope_kind": "subscription",
            "scope_id": sub,
            "status": "ok",
            "started_at": NOW - timedelta(minutes=10),
            "finished_at": NOW - timedelta(minutes=10),
            "api_calls": 1,
        }
        for sub in subs
    ]
    passes = [
        {
            "kind": "full",
            "trigger": "cron",
            "status": "ok",
            "started_at": NOW - timedelta(hours=6 * k),
            "finished_at": NOW - timedelta(hours=6 * k) + timedelta(minutes=8),
            "api_calls": SUBSCRIPTIONS + 20,
            "scopes_seen": SUBSCRIPTIONS,
        }
        for k in range(8, 0, -1)
    ]
    deliveries = [
        {
            "webhook_id": f"msg_{k:06d}",
            "event_type": "customer_seat.claimed",
            "payload": json.dumps(
                {"type": "customer_seat.claimed", "data": seats[k % 1000]}, default=str
            ),
            "received_at": NOW - timedelta(minutes=k),
            "processed_at": NOW - timedelta(minutes=k) + timedelta(seconds=2),
            "outcome": "synced",
        }
        for k in range(5_000)
    ]
    reminders = [
        {
            "seat_id": s["id"],
            "scope_kind": "subscription",
            "scope_id": s["subscription_id"],
            "recipient": s["customer_email"] or "x@example.com",
            "invitation_expires_at": s["invitation_token_expires_at"],
            "created_at": NOW,
            "outcome": "sent",
        }
        for s in seats[:300]
    ]
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(insert(Seat), seats)
        conn.execute(insert(SeatChange), changes)
        conn.execute(insert(SeatScope), scopes)
        conn.execute(insert(SyncRun), runs)
        conn.execute(insert(SyncRun), passes)
        conn.execute(insert(WebhookDelivery), deliveries)
        conn.execute(insert(InvitationReminder), reminders)
    engine.dispose()
    claimed = next(s for s in seats if s["status"] == "claimed" and s["email"] is None)
    member = next(s for s in seats if s["status"] == "claimed" and s["email"] is not None)
    return {
        "email": claimed["customer_email"],
        "member_email": member["email"],
        "seat": claimed["id"],
        "subscription": claimed["subscription_id"],
        "changes": len(changes),
    }


def timed(argv: list[str], env: dict[str, str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) time of `runs` fresh processes, in milliseconds (one
    untimed warm-up first, so the page cache holds the files, as on any machine that ran
    the program once). CPU time says what the process costs when others load the machine."""
    subprocess.run(argv, env=env, check=True, capture_output=True)  # noqa: S603 - ours
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True)  # noqa: S603 - ours
        walls.append((time.perf_counter() - started) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{argv} failed: {done.stderr.decode()}")
    return walls, cpus


def baseline(path: Path, sql: str, params: dict[str, Any]) -> list[str]:
    """`python -c`: sqlite3, the same SQL, rows printed as JSON."""
    code = (
        "import json, sqlite3, sys\n"
        f"c = sqlite3.connect('file:{path}?mode=ro', uri=True)\n"
        f"cur = c.execute({sql!r}, {params!r})\n"
        "names = [d[0] for d in cur.description]\n"
        "sys.stdout.write(json.dumps([dict(zip(names, r)) for r in cur.fetchall()]))\n"
    )
    return [PYTHON, "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--keep", type=Path, help="Build (or reuse) the mirror here.")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="pss_cli_cold_"))
    work.mkdir(parents=True, exist_ok=True)
    path = (work / "mirror.db").resolve()
    fixture = work / "fixture.json"
    if not path.exists():
        started = time.perf_counter()
        fixture.write_text(json.dumps(build_mirror(path)))
        print(f"built {path} in {time.perf_counter() - started:.1f} s")
    asked = json.loads(fixture.read_text())
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POLAR_", "DATABASE_", "REDIS_", "DATA_DIR"))
    }
    env.update(DATABASE_URL=f"sqlite:///{path}", DATA_DIR=str(work / "no-redis"), COLUMNS="100")
    last = asked["changes"]
    email, seat = asked["email"], asked["seat"]
    seat_sql = (
        "SELECT * FROM seat WHERE lower(coalesce(email, customer_email)) = :e AND gone_at IS NULL"
    )
    with_redis = {**env, "REDIS_URL": REDIS_URL}
    commands: list[tuple[list[str], list[str], dict[str, str]]] = [
        (
            seat_sync("seats", "--email", email, "--format", "json"),
            baseline(path, seat_sql, {"e": email}),
            env,
        ),
        (seat_sync("seats", "--email", email), baseline(path, seat_sql, {"e": email}), env),
        (
            seat_sync("seats", "--subscription", asked["subscription"]),
            baseline(
                path,
                "SELECT * FROM seat WHERE subscription_id = :s AND gone_at IS NULL",
                {"s": asked["subscription"]},
            ),
            env,
        ),
        (
            seat_sync("seat", seat[:8]),
            baseline(path, "SELECT * FROM seat_change WHERE seat_id = :s", {"s": seat}),
            env,
        ),
        (
            seat_sync("scopes", "--format", "json"),
            baseline(path, "SELECT * FROM seat_scope ORDER BY kind, scope_id", {}),
            env,
        ),
        (
            seat_sync("history", "--email", email),
            baseline(
                path,
                "SELECT * FROM seat_change WHERE lower(old_email) = :e OR lower(new_email) = :e",
                {"e": email},
            ),
            env,
        ),
        (
            seat_sync("history", "--lost", "--since", "7d"),
            baseline(
                path,
                "SELECT * FROM seat_change WHERE observed_at >= :s",
                {"s": str(NOW - timedelta(days=7))[:26]},
            ),
            env,
        ),
        (
            seat_sync("status"),
            baseline(
                path,
                "SELECT * FROM sync_run WHERE kind = 'full' ORDER BY id DESC LIMIT 5",
                {},
            ),
            env,
        ),
        (
            seat_sync("changes", "--after", str(last - 100), "--format", "ndjson"),
            baseline(
                path,
                "SELECT * FROM seat_change WHERE id > :a ORDER BY id LIMIT 1000",
                {"a": last - 100},
            ),
            env,
        ),
        (
            seat_sync("status"),
            baseline(
                path,
                "SELECT * FROM sync_run WHERE kind = 'full' ORDER BY id DESC LIMIT 5",
                {},
            ),
            with_redis,
        ),
    ]
    load_before = os.getloadavg()
    interpreter, interpreter_cpu = timed([PYTHON, "-c", "pass"], env, args.runs)
    figures = [
        Figure(
            "python -c pass (ms, median)",
            round(statistics.median(interpreter), 1),
            f"max {max(interpreter):.1f}; CPU median {statistics.median(interpreter_cpu):.1f}",
        )
    ]
    worst = 0.0
    for command, floor, command_env in commands:
        ours, ours_cpu = timed(command, command_env, args.runs)
        plain, plain_cpu = timed(floor, env, args.runs)
        shown = " ".join(command[1:]) + (" (with REDIS_URL)" if command_env is with_redis else "")
        worst = max(worst, max(ours))
        figures.append(
            Figure(
                f"seat-sync {shown} (ms, median)",
                round(statistics.median(ours), 1),
                f"max {max(ours):.1f}, CPU {statistics.median(ours_cpu):.0f}; sqlite3 -c: "
                f"median {statistics.median(plain):.1f}, max {max(plain):.1f}, "
                f"CPU {statistics.median(plain_cpu):.0f}",
                f"<= {TARGET_MS:g}",
                max(ours) <= TARGET_MS,
            )
        )
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    report(
        "cli_cold",
        figures,
        {"load_before": load_before, "load_after": load_after, "mirror": str(path)},
    )
    sys.exit(0 if worst <= TARGET_MS else 1)


if __name__ == "__main__":
    main()
