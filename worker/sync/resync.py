"""Full resync: discover every seat-based subscription and order, then sync each scope.

Webhooks get lost (Polar disables an endpoint after 10 failed events), so the mirror heals
itself. A pass is one `sync_run` (kind "full") with one `resync_item` per scope; discovery
progress is committed page by page and each item is marked done as it is synced, so a pass
killed half way resumes where it stopped. Each scope goes through the same `sync_scope` as
webhook jobs, whose freshness guard means a pass never overwrites newer state; a scope
synced after the pass started is skipped outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from worker.models import ResyncItem, SeatScope, SyncRun, utcnow
from worker.platform.db import insert_ignoring_conflict, retry_transaction
from worker.polar.errors import AuthError, Lane, PolarError, PolarMisconfiguredError
from worker.polar.retry import call_with_retries
from worker.polar.schemas import Page
from worker.resources import PolarResources, Resources
from worker.sync import scope as sync

log = structlog.get_logger("worker.sync.resync")

LOCK_KEY = "seat-sync:lock:resync-all"
LOCK_TTL_MS = 15_000  # refreshed every TTL/4: a killed pass frees the lock quickly
# Attempts of one scope (or one page of discovery) before the pass records it as failed.
ITEM_TRIES = 4

Progress = Callable[[int, int], None]
T = TypeVar("T")


class PageLister(Protocol):
    def __call__(self, page: int, *, lane: Lane) -> Awaitable[Page[Any]]: ...


class _Counted(Generic[T]):
    """A call that counts how often it was made: every attempt spends from Polar's budget."""

    def __init__(self, call: Callable[[], Awaitable[T]]) -> None:
        self._call = call
        self.made = 0

    async def __call__(self) -> T:
        self.made += 1
        return await self._call()


@dataclass
class PassSummary:
    run_id: int
    resumed: bool
    scopes: int
    synced: int
    skipped: int
    gone: int
    failed: int
    api_calls: int
    seats_changed: int


class PassBusyError(Exception):
    """Another process is running the full resync right now."""


@contextlib.asynccontextmanager
async def _pass_lock(resources: PolarResources) -> AsyncIterator[None]:
    """One pass at a time across the fleet; the lock is refreshed while the pass runs."""
    redis = resources.redis
    if redis is None:
        yield
        return
    token = uuid.uuid4().hex
    if not await redis.set(LOCK_KEY, token, nx=True, px=LOCK_TTL_MS):
        raise PassBusyError("a full resync is already running")

    async def refresh() -> None:
        while True:
            await asyncio.sleep(LOCK_TTL_MS / 4000)
            with contextlib.suppress(Exception):
                if await redis.get(LOCK_KEY) == token.encode():
                    await redis.pexpire(LOCK_KEY, LOCK_TTL_MS)

    keeper = asyncio.create_task(refresh())
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(BaseException):
            await keeper
        with contextlib.suppress(Exception):
            if await redis.get(LOCK_KEY) == token.encode():
                await redis.delete(LOCK_KEY)


async def _add_items(
    resources: Resources,
    run_id: int,
    scopes: Iterable[tuple[str, str]],
    progress: dict[str, Any],
    calls: int,
) -> None:
    rows = [{"run_id": run_id, "kind": k, "scope_id": s} for k, s in scopes]

    async def work(session: AsyncSession) -> None:
        for start in range(0, len(rows), 500):
            await session.execute(
                insert_ignoring_conflict(session, ResyncItem).values(rows[start : start + 500])
            )
        await session.execute(
            update(SyncRun)
            .where(col(SyncRun.id) == run_id)
            .values(
                progress=json.dumps(progress),
                heartbeat_at=utcnow(),
                api_calls=SyncRun.api_calls + calls,
            )
        )

    await retry_transaction(resources.sessions, work)


async def _open_or_resume(
    resources: Resources, *, trigger: str, force: bool, interval: timedelta
) -> tuple[SyncRun | None, bool]:
    async def work(session: AsyncSession) -> tuple[SyncRun | None, bool]:
        unfinished = (
            await session.execute(
                select(SyncRun)
                .where(col(SyncRun.kind) == "full", col(SyncRun.finished_at).is_(None))
                .order_by(col(SyncRun.id).desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if unfinished is not None:
            return unfinished, True
        last = (
            await session.execute(
                select(func.max(SyncRun.started_at)).where(col(SyncRun.kind) == "full")
            )
        ).scalar_one_or_none()
        if not force and last is not None and utcnow() - last < interval:
            return None, False
        run = SyncRun(
            kind="full",
            trigger=trigger,
            started_at=utcnow(),
            heartbeat_at=utcnow(),
            progress=json.dumps({"subscriptions_page": 1, "orders_page": 1, "discovered": False}),
        )
        session.add(run)
        await session.flush()
        return run, False

    return await retry_transaction(resources.sessions, work)


async def _discover(resources: PolarResources, run: SyncRun) -> None:
    """Walk the subscription and order lists (oldest first), page by page, resumably."""
    assert run.id is not None
    polar = resources.polar
    progress: dict[str, Any] = json.loads(run.progress or "{}")
    if progress.get("discovered"):
        return
    listers: tuple[tuple[str, PageLister], ...] = (
        ("subscription", polar.subscriptions_page),
        ("order", polar.orders_page),
    )
    for kind, lister in listers:
        key = f"{kind}s_page"
        page = int(progress.get(key, 1))
        while True:
            fetch = _Counted(functools.partial(lister, page, lane="resync"))
            listed = await call_with_retries(
                fetch, attempts=ITEM_TRIES, base=resources.settings.sync_retry_base_seconds
            )
            found = [(kind, item.id) for item in listed.items if item.is_seat_based]
            progress[key] = page + 1
            await _add_items(resources, run.id, found, progress, calls=fetch.made)
            if page >= listed.pagination.max_page or not listed.items:
                break
            page += 1
    known = await _known_scopes(resources)
    progress["discovered"] = True
    await _add_items(resources, run.id, known, progress, calls=0)


async def _known_scopes(resources: Resources) -> list[tuple[str, str]]:
    async with resources.sessions() as session:
        rows = await session.execute(
            select(col(SeatScope.kind), col(SeatScope.scope_id)).where(
                col(SeatScope.gone_at).is_(None)
            )
        )
        return [(r.kind, r.scope_id) for r in rows]


async def _sync_item(
    resources: PolarResources, run: SyncRun, kind: str, scope_id: str
) -> tuple[str, int, int]:
    """(outcome, api calls, seats changed) for one scope of the pass."""
    assert run.id is not None
    async with resources.sessions() as session:
        scope = await session.get(SeatScope, (kind, scope_id))
    if (
        scope is not None
        and scope.last_synced_at is not None
        and scope.last_synced_at >= run.started_at
    ):
        return "skipped", 0, 0  # a webhook-driven sync already did it during this pass
    attempt = _Counted(
        functools.partial(
            sync.sync_scope,
            resources,
            kind=kind,
            scope_id=scope_id,
            trigger="resync",
            lane="resync",
        )
    )
    try:
        outcome = await call_with_retries(
            attempt, attempts=ITEM_TRIES, base=resources.settings.sync_retry_base_seconds
        )
    except (AuthError, PolarMisconfiguredError):
        raise  # no scope can sync until the token or configuration is fixed: stop the pass
    except PolarError:
        return "failed", attempt.made, 0
    changed = outcome.result.written if outcome.result is not None else 0
    return outcome.status, attempt.made, changed


async def _finish_item(
    resources: Resources,
    run_id: int,
    kind: str,
    scope_id: str,
    outcome: str,
    calls: int,
    changed: int,
) -> None:
    async def work(session: AsyncSession) -> None:
        now = utcnow()
        await session.execute(
            update(ResyncItem)
            .where(
                col(ResyncItem.run_id) == run_id,
                col(ResyncItem.kind) == kind,
                col(ResyncItem.scope_id) == scope_id,
            )
            .values(done_at=now, outcome=outcome)
        )
        await session.execute(
            update(SyncRun)
            .where(col(SyncRun.id) == run_id)
            .values(
                api_calls=SyncRun.api_calls + calls,
                updated=SyncRun.updated + changed,
                errors=SyncRun.errors + (1 if outcome == "failed" else 0),
                gone=SyncRun.gone + (1 if outcome == "gone" else 0),
                heartbeat_at=now,
            )
        )

    await retry_transaction(resources.sessions, work)


async def _open_items(resources: Resources, run_id: int) -> list[tuple[str, str]]:
    async with resources.sessions() as session:
        rows = await session.execute(
            select(col(ResyncItem.kind), col(ResyncItem.scope_id))
            .where(col(ResyncItem.run_id) == run_id, col(ResyncItem.done_at).is_(None))
            .order_by(col(ResyncItem.kind).desc(), col(ResyncItem.scope_id))
        )
        return [(r.kind, r.scope_id) for r in rows]


async def _item_counts(resources: Resources, run_id: int) -> tuple[int, int]:
    async with resources.sessions() as session:
        total = (
            await session.execute(
                select(func.count()).select_from(ResyncItem).where(col(ResyncItem.run_id) == run_id)
            )
        ).scalar_one()
        done = (
            await session.execute(
                select(func.count())
                .select_from(ResyncItem)
                .where(col(ResyncItem.run_id) == run_id, col(ResyncItem.done_at).is_not(None))
            )
        ).scalar_one()
    return int(total), int(done)


async def _summarise(
    resources: Resources, run_id: int, resumed: bool, error: str | None
) -> PassSummary:
    async def work(session: AsyncSession) -> PassSummary:
        rows = await session.execute(
            select(col(ResyncItem.outcome), func.count())
            .where(col(ResyncItem.run_id) == run_id)
            .group_by(col(ResyncItem.outcome))
        )
        counts: dict[str | None, int] = {r[0]: int(r[1]) for r in rows}
        run = await session.get(SyncRun, run_id)
        assert run is not None
        total = sum(counts.values())
        run.scopes_seen = total
        run.finished_at = utcnow()
        run.error = error
        run.status = "failed" if error else ("ok" if not counts.get("failed") else "partial")
        return PassSummary(
            run_id=run_id,
            resumed=resumed,
            scopes=total,
            synced=counts.get("ok", 0) + counts.get("stale", 0),
            skipped=counts.get("skipped", 0),
            gone=counts.get("gone", 0),
            failed=counts.get("failed", 0),
            api_calls=run.api_calls,
            seats_changed=run.updated,
        )

    return await retry_transaction(resources.sessions, work)


async def resync_all(
    resources: PolarResources,
    *,
    trigger: str = "cron",
    force: bool = False,
    progress: Progress | None = None,
) -> PassSummary | None:
    """Run (or resume) a full pass. None when no pass is due. PassBusyError when one runs."""
    interval = timedelta(minutes=resources.settings.resync_interval_minutes)
    async with _pass_lock(resources):
        run, resumed = await _open_or_resume(
            resources, trigger=trigger, force=force, interval=interval
        )
        if run is None:
            return None
        assert run.id is not None
        bound = log.bind(run_id=run.id, resumed=resumed)
        bound.info("resync_pass_started")
        try:
            await _discover(resources, run)
            total, done = await _item_counts(resources, run.id)
            if progress is not None:
                progress(done, total)
            await _sync_open_items(resources, run, total, done, progress)
        except (AuthError, PolarMisconfiguredError) as exc:
            await _summarise(resources, run.id, resumed, str(exc))
            bound.error("resync_pass_failed", error=str(exc), error_class=type(exc).__name__)
            raise
        summary = await _summarise(resources, run.id, resumed, None)
        bound.info(
            "resync_pass_finished",
            scopes=summary.scopes,
            synced=summary.synced,
            skipped=summary.skipped,
            gone=summary.gone,
            failed=summary.failed,
            api_calls=summary.api_calls,
            seats_changed=summary.seats_changed,
        )
        return summary


async def _sync_open_items(
    resources: PolarResources, run: SyncRun, total: int, done: int, progress: Progress | None
) -> None:
    assert run.id is not None
    run_id = run.id
    items = await _open_items(resources, run_id)
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    finished = done
    stopped: list[PolarError] = []

    async def lane_worker() -> None:
        nonlocal finished
        while not stopped:
            try:
                kind, scope_id = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                outcome, calls, changed = await _sync_item(resources, run, kind, scope_id)
            except (AuthError, PolarMisconfiguredError) as exc:
                # Every other scope would fail the same way: the other lanes finish the
                # scope in hand and take no more, and the pass ends as failed.
                stopped.append(exc)
                return
            await _finish_item(resources, run_id, kind, scope_id, outcome, calls, changed)
            finished += 1
            if progress is not None:
                progress(finished, total)

    workers = [
        asyncio.create_task(lane_worker()) for _ in range(resources.settings.resync_concurrency)
    ]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    if stopped:
        raise stopped[0]


def due_since(last: datetime | None, interval: timedelta, now: datetime) -> bool:
    return last is None or now - last >= interval
