"""The `seat-sync` command as people and scripts run it: a real subprocess, real databases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import env_for, seat_sync
from worker.polar.schemas import CustomerSeat
from worker.simulator.server import SimulatedPolar


def normalised(seat: dict[str, Any]) -> dict[str, Any]:
    return CustomerSeat.model_validate(seat).model_dump(mode="json")


async def test_resync_mirrors_every_key_then_writes_nothing(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=3)
    a = state.assign(subscription_id=sub["id"], email="ann@example.com", metadata={"k": "v"})
    state.claim(a["id"])
    b = state.assign(subscription_id=sub["id"], email="bo@example.com")
    state.revoke(b["id"])
    env = env_for(database_url, sim, redis_url)

    first = await seat_sync("resync", "--subscription", sub["id"], env=env)
    assert first.code == 0, first.err
    assert "2 inserted, 0 updated, 0 unchanged" in first.out

    listed = await seat_sync("seats", "--subscription", sub["id"], "--format", "json", env=env)
    assert listed.code == 0, listed.err
    rows = json.loads(listed.out)
    expected = {s["id"]: s for s in state.list_seats(subscription_id=sub["id"])["seats"]}
    assert {r["id"]: normalised(r) for r in rows} == {k: normalised(v) for k, v in expected.items()}
    assert all(set(r) == set(CustomerSeat.model_fields) for r in rows)

    second = await seat_sync("resync", "--subscription", sub["id"], env=env)
    assert second.code == 0, second.err
    assert "0 inserted, 0 updated, 2 unchanged" in second.out
    assert "no changes" in second.out


async def test_seats_filters_and_formats(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=3)
    state.assign(subscription_id=sub["id"], email="Cy@Example.com")
    c = state.assign(subscription_id=sub["id"], email="di@example.com")
    state.claim(c["id"])
    env = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0

    pending = await seat_sync("seats", "--status", "pending", "--format", "ndjson", env=env)
    lines = [json.loads(line) for line in pending.out.splitlines()]
    assert [r["email"] for r in lines] == ["Cy@Example.com"]
    by_email = await seat_sync("seats", "--email", "cy@example.com", "--format", "csv", env=env)
    header, row = by_email.out.strip().splitlines()
    assert "member_email" in header.split(",") and "Cy@Example.com" in row
    table = await seat_sync("seats", env=env)
    assert table.code == 0 and "di@example.com" in table.out


async def test_resync_all_and_status(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    for _ in range(3):
        sub = sim.state.create_subscription(seats=2)
        sim.state.assign(subscription_id=sub["id"], email=f"x{sub['id'][:4]}@example.com")
    env = env_for(database_url, sim, redis_url)
    ran = await seat_sync("resync", "--all", env=env)
    assert ran.code == 0, ran.err
    assert "3 scopes, 3 synced" in ran.out
    status = await seat_sync("status", "--format", "json", env=env)
    report = json.loads(status.out)
    assert report["full_resyncs"][0]["status"] == "ok"
    assert report["full_resyncs"][0]["scopes"] == 3
    assert report["deliveries_pending"] == 0
    # Read from the fleet's Redis: nothing queued; the pass's calls in the budget's window.
    assert report["queue_depth"] == 0
    assert report["rate_budget"]["used"] >= report["full_resyncs"][0]["api_calls"] > 0


async def test_remind_dry_run_lists_without_sending(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    state = sim.state
    sub = state.create_subscription(seats=2)
    state.advance(-20 * 3600)
    seat = state.assign(subscription_id=sub["id"], email="soon@example.com")
    state.advance(20 * 3600)
    env = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub["id"], env=env)).code == 0
    ran = await seat_sync("remind", "--dry-run", env=env)
    assert ran.code == 0, ran.err
    assert seat["id"] in ran.out and "soon@example.com" in ran.out
    assert state.resend_count(seat["id"]) == 0
    sent = await seat_sync("remind", env=env)
    assert "sent" in sent.out and state.resend_count(seat["id"]) == 1


async def test_missing_database_says_how_to_create_it(tmp_path: Path) -> None:
    ran = await seat_sync("seats", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}"})
    assert ran.code == 1
    assert "seat-sync db upgrade" in ran.err
    assert len(ran.err.strip().splitlines()) <= 2


async def test_bad_setting_is_named_in_one_line(tmp_path: Path) -> None:
    ran = await seat_sync(
        "seats",
        env={"POLAR_REQUESTS_PER_MINUTE": "lots", "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"},
    )
    assert ran.code == 2
    assert "POLAR_REQUESTS_PER_MINUTE" in ran.err


async def test_insecure_api_url_is_refused(tmp_path: Path) -> None:
    ran = await seat_sync(
        "resync",
        "--subscription",
        "x",
        env={
            "POLAR_API_URL": "http://api.example.com",
            "POLAR_ACCESS_TOKEN": "t",
            "DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        },
    )
    assert ran.code == 2 and "POLAR_API_URL" in ran.err and "https" in ran.err


async def test_auth_failure_is_one_line_without_the_token(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub = sim.state.create_subscription(seats=1)
    env = env_for(database_url, sim, redis_url, POLAR_ACCESS_TOKEN="polar_oat_secret_value_123")
    ran = await seat_sync("resync", "--subscription", sub["id"], env=env)
    assert ran.code == 1
    assert "POLAR_ACCESS_TOKEN" in ran.err
    assert "polar_oat_secret_value_123" not in ran.err + ran.out


# ---------------------------------------------------------------------- failing in one line

# Every command, with arguments that get it past its own checks to reading the settings.
EVERY_COMMAND: dict[str, tuple[str, ...]] = {
    "run": ("run",),
    "worker": ("worker",),
    "web": ("web",),
    "resync": ("resync", "--subscription", "sub_x"),
    "verify": ("verify",),
    "assign": ("assign", "--subscription", "sub_x", "--email", "a@example.com"),
    "revoke": ("revoke", "seat_x"),
    "resend": ("resend", "seat_x"),
    "remind": ("remind", "--dry-run"),
    "renew": ("renew", "--dry-run"),
    "seats": ("seats",),
    "seat": ("seat", "seat_x"),
    "scopes": ("scopes",),
    "history": ("history", "--lost"),
    "status": ("status",),
    "changes": ("changes",),
    "prune": ("prune", "--dry-run"),
    "db": ("db", "upgrade"),
}
# These read no settings: the simulated Polar and the self-contained demo.
NO_SETTINGS = {"simulator", "demo"}
NEED_TOKEN = ("run", "worker", "resync", "verify", "assign", "revoke", "resend", "remind", "renew")


def one_error_line(err: str) -> str:
    """The one line a failure prints (log lines of a process that started may precede it)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_every_command_is_covered() -> None:
    import typer.main

    from worker.cli.app import app

    group = typer.main.get_command(app)
    assert isinstance(group, typer.main.TyperGroup)
    assert set(group.commands) == set(EVERY_COMMAND) | NO_SETTINGS


@pytest.mark.parametrize("command", sorted(EVERY_COMMAND))
async def test_a_bad_setting_is_one_line_naming_it(command: str, tmp_path: Path) -> None:
    ran = await seat_sync(
        *EVERY_COMMAND[command],
        env={"DATABASE_URL": "mysql://db.example.com/seats", "POLAR_ACCESS_TOKEN": "t"},
        cwd=tmp_path,
    )

    assert ran.code == 2, ran.err
    assert "DATABASE_URL" in one_error_line(ran.err)


@pytest.mark.parametrize("command", NEED_TOKEN)
async def test_a_missing_token_is_one_line_naming_it(command: str, tmp_path: Path) -> None:
    ran = await seat_sync(
        *EVERY_COMMAND[command], env={"DATABASE_URL": f"sqlite:///{tmp_path}/m.db"}, cwd=tmp_path
    )

    assert ran.code == 2, ran.err
    assert "POLAR_ACCESS_TOKEN is not set" in one_error_line(ran.err)


async def test_web_without_the_webhook_secret_is_one_line(tmp_path: Path) -> None:
    ran = await seat_sync("web", env={"DATABASE_URL": f"sqlite:///{tmp_path}/m.db"}, cwd=tmp_path)

    assert ran.code == 2
    assert "POLAR_WEBHOOK_SECRET is not set" in one_error_line(ran.err)


@pytest.mark.parametrize("command", ["worker", "status", "seats", "prune"])
async def test_an_unreachable_database_is_one_line(command: str, tmp_path: Path) -> None:
    ran = await seat_sync(
        *EVERY_COMMAND[command],
        env={
            "DATABASE_URL": "postgresql://seat_sync@127.0.0.1:9/seats",
            "POLAR_ACCESS_TOKEN": "t",
            "REDIS_URL": "redis://127.0.0.1:9/0",
        },
        cwd=tmp_path,
    )

    assert ran.code == 1, ran.err
    line = one_error_line(ran.err)
    assert "connect" in line.lower() or "refused" in line.lower()


async def test_a_read_setting_is_checked_by_the_settings_rules(tmp_path: Path) -> None:
    ran = await seat_sync(
        "status",
        env={"DATABASE_URL": f"sqlite:///{tmp_path}/m.db", "POLAR_API_VERSION": "2019-01"},
        cwd=tmp_path,
    )

    assert ran.code == 2
    assert "POLAR_API_VERSION" in one_error_line(ran.err)


async def test_status_of_an_idle_mirror_has_no_empty_figures(
    database_url: str, tmp_path: Path
) -> None:
    ran = await seat_sync(
        "status", env={"DATABASE_URL": database_url, "DATA_DIR": str(tmp_path)}, cwd=tmp_path
    )

    assert ran.code == 0, ran.err
    assert "None" not in ran.out
    assert "deliveries not yet processed: 0\n" in ran.out
    assert "queue depth: unknown (no Redis reachable)" in ran.out


# ---------------------------------------------------------------------- the read settings

READ_FIELDS = (
    "database_url",
    "redis_url",
    "data_dir",
    "polar_api_url",
    "polar_api_version",
    "polar_requests_per_minute",
    "polar_rate_window_seconds",
)
ENVIRONMENTS: list[dict[str, str]] = [
    {},
    {"DATABASE_URL": "  "},
    {"DATABASE_URL": "postgres://u@h/db", "REDIS_URL": " redis://h:6379/2 "},
    {"database_url": "sqlite:///x.db", "redis_url": ""},
    {"DATABASE_URL": "mysql://h/db"},
    {"REDIS_URL": "http://h"},
    {"DATA_DIR": "/var/lib/seat-sync"},
    {"POLAR_API_URL": "https://sandbox-api.polar.sh/"},
    {"POLAR_API_URL": "http://127.0.0.1:8900"},
    {"POLAR_API_URL": "http://api.example.com"},
    {"POLAR_API_URL": "http://api.example.com", "POLAR_ALLOW_INSECURE_URL": "yes"},
    {"POLAR_API_URL": "http://api.example.com", "POLAR_ALLOW_INSECURE_URL": "maybe"},
    {"POLAR_API_URL": "ftp://x"},
    {"POLAR_API_VERSION": "2026-04"},
    {"POLAR_API_VERSION": " 2026-10 "},
    {"POLAR_API_VERSION": "2027-01"},
    {"POLAR_REQUESTS_PER_MINUTE": "250"},
    {"POLAR_REQUESTS_PER_MINUTE": " 250 "},
    {"POLAR_REQUESTS_PER_MINUTE": "0"},
    {"POLAR_REQUESTS_PER_MINUTE": "lots"},
    {"POLAR_RATE_WINDOW_SECONDS": "0.5"},
    {"POLAR_RATE_WINDOW_SECONDS": "1e1"},
    {"POLAR_RATE_WINDOW_SECONDS": "-1"},
]


@pytest.mark.parametrize("values", ENVIRONMENTS, ids=lambda v: ",".join(v) or "defaults")
def test_read_settings_agree_with_the_settings_class(
    values: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The read commands' light reader takes what `Settings` takes, with the same values,
    and refuses what it refuses with its message."""
    from tests.support.commands import forget_own_variables
    from worker.config import ConfigError, load_settings
    from worker.query.environment import read_settings

    forget_own_variables(monkeypatch)
    for name in ("DATA_DIR", "POLAR_ALLOW_INSECURE_URL", "POLAR_RATE_WINDOW_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    try:
        full = load_settings()
    except ConfigError as refused:
        message = str(refused)
    else:
        light = read_settings()
        assert {f: getattr(light, f) for f in READ_FIELDS} == {
            f: getattr(full, f) for f in READ_FIELDS
        }
        return
    with pytest.raises(ConfigError) as light_refused:
        read_settings()
    assert str(light_refused.value) == message


def test_read_settings_defaults_are_the_settings_defaults() -> None:
    from worker import config
    from worker.query import environment

    fields = config.Settings.model_fields
    assert environment.POLAR_API_VERSIONS == config.POLAR_API_VERSIONS
    assert environment.DEFAULT_SQLITE_FILE == config.DEFAULT_SQLITE_FILE
    for name, default in environment.DEFAULTS.items():
        assert str(fields[name].default) == default or fields[name].default == float(default)


async def test_status_without_its_redis_says_what_the_database_knows(
    database_url: str, tmp_path: Path
) -> None:
    ran = await seat_sync(
        "status",
        "--format",
        "json",
        env={"DATABASE_URL": database_url, "REDIS_URL": "redis://127.0.0.1:9/0"},
        cwd=tmp_path,
    )

    assert ran.code == 0, ran.err
    report = json.loads(ran.out)
    assert (report["queue_depth"], report["rate_budget"]) == (None, None)
    assert report["full_resyncs"] == []


def test_the_light_readers_use_the_workers_names() -> None:
    """The read path names Redis keys and the private socket without importing the worker's
    modules; these are the same names."""
    from worker import queue
    from worker.platform import redis
    from worker.polar import budget
    from worker.query import fleet, mirror

    assert fleet.QUEUE_KEY == queue.QUEUE_NAME
    assert fleet.BUDGET_LOG_KEY == budget.KEY_LOG
    assert mirror.socket_path(Path("d")) == redis.socket_path(Path("d"))


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("changes", "--after", "abc"), "'abc' is not a valid integer"),
        (("changes", "--limit", "0"), "0 must be >= 1"),
        (("seats", "--format", "xml"), "'xml' is not one of 'table', 'json', 'csv', 'ndjson'"),
        (("seats", "--status", "gone"), "--status must be pending, claimed or revoked"),
        (("seats", "--expiring-within", "soon"), "not a duration: 'soon'"),
        (("nosuch",), "No such command 'nosuch'"),
    ],
)
async def test_a_bad_argument_is_one_line(args: tuple[str, ...], said: str, tmp_path: Path) -> None:
    ran = await seat_sync(*args, env={"DATABASE_URL": f"sqlite:///{tmp_path}/m.db"})

    assert ran.code == 2
    assert said in one_error_line(ran.err)
    assert len(ran.err.strip().splitlines()) == 1
