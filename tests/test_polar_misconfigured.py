"""A 404 means "gone" only when Polar says so (`ResourceNotFound`). A 404 without an error
code is what a wrong POLAR_API_URL or an unknown API version gets: the mirror keeps every
seat, the scope records what to check, nothing retries in a loop, and people are told."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from sqlalchemy import select
from sqlmodel import col

from tests.support.commands import env_for, seat_sync
from tests.support.settings import SIM_TOKEN, make_settings
from tests.support.workers import run_worker_until_idle, worker_resources
from worker import queue
from worker.models import Seat, SeatScope, SyncRun
from worker.polar.client import PolarClient
from worker.polar.errors import NotFoundError, PolarMisconfiguredError
from worker.resources import PolarResources, WorkerResources
from worker.simulator.server import SimulatedPolar
from worker.sync.resync import resync_all
from worker.sync.scope import sync_scope

HINT = "check POLAR_API_URL and POLAR_API_VERSION"
# What Polar's router answers for a path it has no route for, or an unknown Polar-Version;
# a proxy or a stand-in may answer plain text. Neither carries Polar's `error` key.
BARE_404_BODIES: list[str | dict[str, Any]] = [{"detail": "Not Found"}, "Not Found"]


def populated(sim: SimulatedPolar) -> str:
    sub = sim.state.create_subscription(seats=3)
    a = sim.state.assign(subscription_id=sub["id"], email="ann@example.com")
    sim.state.claim(a["id"])
    sim.state.assign(subscription_id=sub["id"], email="ben@example.com")
    return str(sub["id"])


async def snapshot(services: PolarResources) -> dict[str, tuple[str, str | None, object]]:
    async with services.sessions() as session:
        seats = (await session.execute(select(Seat))).scalars().all()
    return {s.id: (s.status, s.email, s.gone_at) for s in seats}


async def scope_row(services: PolarResources, kind: str, scope_id: str) -> SeatScope:
    async with services.sessions() as session:
        scope = await session.get(SeatScope, (kind, scope_id))
    assert scope is not None
    return scope


def misconfigured_total() -> float:
    return REGISTRY.get_sample_value("seat_sync_polar_misconfigured_total") or 0.0


@pytest.fixture
async def wrong_url(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> AsyncIterator[WorkerResources]:
    """Resources whose POLAR_API_URL has a wrong base path: every call reaches no route."""
    settings = make_settings(database_url, sim, polar_api_url=sim.base_url + "/wrong")
    async with worker_resources(settings, redis_url) as started:
        yield started


async def test_wrong_base_url_keeps_the_scope_and_its_seats(
    sim: SimulatedPolar, services: PolarResources, wrong_url: PolarResources
) -> None:
    sub_id = populated(sim)
    await sync_scope(services, kind="subscription", scope_id=sub_id)
    before = await snapshot(services)

    with pytest.raises(PolarMisconfiguredError) as info:
        await sync_scope(wrong_url, kind="subscription", scope_id=sub_id)

    assert await snapshot(services) == before
    scope = await scope_row(services, "subscription", sub_id)
    assert scope.gone_at is None
    assert (scope.total_seats, scope.consecutive_failures) == (3, 1)
    assert scope.last_error == str(info.value)
    assert HINT in str(info.value) and "/wrong/v1/customer-seats" in str(info.value)
    assert SIM_TOKEN not in str(info.value)
    async with services.sessions() as session:
        runs = (await session.execute(select(SyncRun).order_by(col(SyncRun.id)))).scalars().all()
    assert [r.status for r in runs] == ["ok", "failed"]


@pytest.mark.parametrize("body", BARE_404_BODIES, ids=["json", "text"])
async def test_any_404_without_an_error_code_is_a_misconfiguration(
    sim: SimulatedPolar, services: PolarResources, body: str | dict[str, Any]
) -> None:
    sub_id = populated(sim)
    await sync_scope(services, kind="subscription", scope_id=sub_id)
    sim.add_fault("/v1/customer-seats", status=404, body=body, times=1)

    with pytest.raises(PolarMisconfiguredError, match=HINT):
        await sync_scope(services, kind="subscription", scope_id=sub_id)

    scope = await scope_row(services, "subscription", sub_id)
    assert scope.gone_at is None and scope.consecutive_failures == 1
    assert all(gone_at is None for _, _, gone_at in (await snapshot(services)).values())


async def test_unknown_api_version_is_a_misconfiguration(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    sub_id = populated(sim)
    await sync_scope(services, kind="subscription", scope_id=sub_id)
    # Settings refuse versions this program has not checked; a retired one looks like this.
    retired = PolarClient(sim.base_url, SecretStr(SIM_TOKEN), api_version="2025-01")
    try:
        with pytest.raises(PolarMisconfiguredError, match="Polar-Version 2025-01") as info:
            await sync_scope(
                dataclasses.replace(services, polar=retired), kind="subscription", scope_id=sub_id
            )
    finally:
        await retired.aclose()
    assert HINT in str(info.value)
    scope = await scope_row(services, "subscription", sub_id)
    assert scope.gone_at is None and scope.consecutive_failures == 1


async def test_polar_saying_resource_not_found_still_marks_the_scope_gone(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    sub_id = populated(sim)
    await sync_scope(services, kind="subscription", scope_id=sub_id)
    sim.state.subscriptions.pop(sub_id)
    sim.state._containers.pop(sub_id)  # Polar no longer knows it

    with pytest.raises(NotFoundError) as info:
        await services.polar.list_seats(subscription_id=sub_id)
    assert info.value.error == "ResourceNotFound"
    outcome = await sync_scope(services, kind="subscription", scope_id=sub_id)

    assert outcome.status == "gone"
    scope = await scope_row(services, "subscription", sub_id)
    assert scope.gone_at is not None
    assert len(await snapshot(services)) == 2  # the seats stay queryable


async def test_metric_counts_each_misconfigured_answer(
    sim: SimulatedPolar, wrong_url: PolarResources
) -> None:
    sub_id = populated(sim)
    before = misconfigured_total()
    for _ in range(2):
        with pytest.raises(PolarMisconfiguredError):
            await sync_scope(wrong_url, kind="subscription", scope_id=sub_id)
    assert misconfigured_total() - before == 2


async def test_job_does_not_retry_a_misconfiguration(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub_id = populated(sim)
    sim.add_fault("/v1/customer-seats", status=404, body={"detail": "Not Found"}, times=None)
    settings = make_settings(database_url, sim, sync_retry_base_seconds=0.01)
    async with worker_resources(settings, redis_url) as services:
        assert await queue.request_sync(services.redis, "subscription", sub_id)
        worker = await run_worker_until_idle(settings, redis_url)
        assert (worker.jobs_failed, worker.jobs_retried) == (1, 0)
        assert sim.log.count(path_prefix="/v1/customer-seats") == 1
        scope = await scope_row(services, "subscription", sub_id)
        assert scope.gone_at is None and HINT in (scope.last_error or "")


async def test_full_resync_stops_without_marking_anything_gone(
    sim: SimulatedPolar, services: PolarResources
) -> None:
    ids = [populated(sim) for _ in range(6)]
    first = await resync_all(services, trigger="cli", force=True)
    assert first is not None and first.synced == 6
    before = await snapshot(services)
    sim.add_fault("/v1/customer-seats", status=404, body={"detail": "Not Found"}, times=None)

    with pytest.raises(PolarMisconfiguredError, match=HINT):
        await resync_all(services, trigger="cli", force=True)

    # Each lane stops at its first failure instead of walking (and failing) every scope.
    concurrency = services.settings.resync_concurrency
    assert sim.log.count(path_prefix="/v1/customer-seats", status=404) <= concurrency
    assert await snapshot(services) == before
    async with services.sessions() as session:
        scopes = (await session.execute(select(SeatScope))).scalars().all()
        last_pass = (
            (
                await session.execute(
                    select(SyncRun)
                    .where(col(SyncRun.kind) == "full")
                    .order_by(col(SyncRun.id).desc())
                )
            )
            .scalars()
            .first()
        )
    assert sorted(s.scope_id for s in scopes) == sorted(ids)
    assert all(s.gone_at is None for s in scopes)
    assert last_pass is not None and last_pass.status == "failed"
    assert last_pass.finished_at is not None and HINT in (last_pass.error or "")


async def test_full_resync_against_a_wrong_url_stops_at_discovery(
    sim: SimulatedPolar, services: PolarResources, wrong_url: PolarResources
) -> None:
    sub_id = populated(sim)
    await sync_scope(services, kind="subscription", scope_id=sub_id)

    with pytest.raises(PolarMisconfiguredError, match="/wrong/v1/subscriptions/"):
        await resync_all(wrong_url, trigger="cli", force=True)

    scope = await scope_row(services, "subscription", sub_id)
    assert scope.gone_at is None and scope.consecutive_failures == 0


# --- the command line ----------------------------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    """What a person reads: stderr without the JSON log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


async def test_cli_says_what_to_check_in_one_line(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    sub_id = populated(sim)
    good = env_for(database_url, sim, redis_url)
    assert (await seat_sync("resync", "--subscription", sub_id, env=good)).code == 0
    bad = {**good, "POLAR_API_URL": sim.base_url + "/wrong"}

    for args in (
        ("resync", "--subscription", sub_id),
        ("verify",),
        ("verify", "--scope", f"subscription:{sub_id}"),
        ("resync", "--all"),
    ):
        ran = await seat_sync(*args, env=bad)
        assert ran.code == 1, (args, ran.err)
        [line] = error_lines(ran.err)
        assert HINT in line, args
        assert "Traceback" not in ran.err and SIM_TOKEN not in ran.err + ran.out

    status = await seat_sync("status", "--format", "json", env=good)
    report = json.loads(status.out)
    problem = report["polar"]["problem"]
    assert "1 scope failing" in problem and "stopped" in problem
    assert f"POLAR_API_URL ({sim.base_url})" in problem
    assert report["failing_scopes"][0]["scope_id"] == sub_id
    assert HINT in report["failing_scopes"][0]["last_error"]
    table = await seat_sync("status", env=good)
    assert table.code == 0 and "Polar answered 404 without an error code" in table.out

    listed = await seat_sync("seats", "--subscription", sub_id, "--format", "json", env=good)
    assert len(json.loads(listed.out)) == 2  # nothing was marked gone


async def test_cli_refuses_an_api_version_it_does_not_know(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    env = env_for(database_url, sim, redis_url, POLAR_API_VERSION="2027-01")
    ran = await seat_sync("resync", "--subscription", "x", env=env)
    assert ran.code == 2
    [line] = error_lines(ran.err)
    assert "POLAR_API_VERSION" in line and "2026-10" in line


async def test_the_configured_api_version_is_sent(
    sim: SimulatedPolar, database_url: str, redis_url: str
) -> None:
    settings = make_settings(
        database_url, sim, polar_api_url=sim.base_url + "/wrong", polar_api_version="2026-04"
    )
    async with worker_resources(settings, redis_url) as services:
        # The message names the request as it left, Polar-Version header included.
        with pytest.raises(PolarMisconfiguredError, match=r"\(Polar-Version 2026-04\)"):
            await services.polar.list_seats(subscription_id=populated(sim))
