"""Regression benchmarks for the reconcile hot path (SQLite file, 1,000 seats).

Run apart from the test suite (pyproject's testpaths only collects tests/):

    .venv/bin/pytest bench/test_reconcile_bench.py --benchmark-only
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.reconcile import make_lists, reparsed
from worker.platform.db import create_engine, session_factory, transaction
from worker.platform.migrate import upgrade
from worker.polar.schemas import SeatsList
from worker.sync.reconcile import reconcile_scope

pytest.importorskip("pytest_benchmark")

SEATS = 1000


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="module")
def seats() -> tuple[str, SeatsList]:
    ((scope_id, seat_list),) = make_lists(1, SEATS).items()
    return scope_id, seat_list


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


async def _reconcile(url: str, scope_id: str, seat_list: SeatsList) -> int:
    engine = create_engine(url)
    try:
        async with transaction(session_factory(engine)) as session:
            result = await reconcile_scope(
                session,
                kind="subscription",
                scope_id=scope_id,
                seats=seat_list,
                fetch_started_at=datetime.now(UTC),
                now=datetime.now(UTC),
            )
        return result.written
    finally:
        await engine.dispose()


def test_initial_load_1000_seats(
    benchmark: pytest.FixtureRequest,
    template: Path,
    tmp_path: Path,
    seats: tuple[str, SeatsList],
    loop: asyncio.AbstractEventLoop,
) -> None:
    scope_id, seat_list = seats
    counter = iter(range(1_000_000))

    def fresh_db() -> tuple[tuple[str], dict[str, object]]:
        path = tmp_path / f"m{next(counter)}.db"
        shutil.copyfile(template, path)
        return (f"sqlite:///{path}",), {}

    def run(url: str) -> int:
        return loop.run_until_complete(_reconcile(url, scope_id, seat_list))

    written = benchmark.pedantic(run, setup=fresh_db, rounds=5, iterations=1)  # type: ignore[attr-defined]
    assert written == SEATS


def test_noop_resync_1000_seats(
    benchmark: pytest.FixtureRequest,
    template: Path,
    tmp_path: Path,
    seats: tuple[str, SeatsList],
    loop: asyncio.AbstractEventLoop,
) -> None:
    scope_id, seat_list = seats
    path = tmp_path / "noop.db"
    shutil.copyfile(template, path)
    url = f"sqlite:///{path}"
    loop.run_until_complete(_reconcile(url, scope_id, seat_list))
    again = reparsed(seat_list)  # the next fetch of the unchanged scope

    def run() -> int:
        return loop.run_until_complete(_reconcile(url, scope_id, again))

    written = benchmark.pedantic(run, rounds=10, iterations=1)  # type: ignore[attr-defined]
    assert written == 0


def test_parse_seat_list_1000(
    benchmark: pytest.FixtureRequest, seats: tuple[str, SeatsList]
) -> None:
    _scope_id, seat_list = seats
    raw = seat_list.model_dump_json()
    parsed = benchmark(SeatsList.model_validate_json, raw)  # type: ignore[operator]
    assert len(parsed.seats) == SEATS
