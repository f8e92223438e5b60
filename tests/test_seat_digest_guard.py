"""The seat_polar_digest_guard trigger (migration 0004): an update that changes one of
Polar's columns but leaves `polar_digest` as it was (anyone but seat-sync) clears the digest,
so the next sync compares the row in full and overwrites the hand edit; seat-sync's own
writes, which set a new digest, and updates of our own columns keep it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from worker.models import Seat

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
SEAT_ID = "seat-1"
DIGEST = bytes.fromhex("0123456789abcdef")
NEW_DIGEST = bytes.fromhex("fedcba9876543210")


@pytest.fixture
async def seat(engine: AsyncEngine) -> str:
    """One claimed seat as seat-sync wrote it, with its digest."""
    async with engine.begin() as conn:
        await conn.execute(
            insert(Seat).values(
                id=SEAT_ID,
                created_at=T0,
                modified_at=T0,
                subscription_id="sub-1",
                status="claimed",
                customer_id="cust-1",
                member_id="mem-1",
                email="ann@example.com",
                seat_metadata={"team": "a", "level": 1},
                synced_at=T0,
                polar_digest=DIGEST,
            )
        )
    return SEAT_ID


async def set_values(engine: AsyncEngine, seat_id: str, **values: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(Seat).where(col(Seat.id) == seat_id).values(**values))


async def stored(engine: AsyncEngine, seat_id: str, column: str) -> tuple[Any, bytes | None]:
    """The column's value and the digest, as stored now."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(getattr(Seat, column), col(Seat.polar_digest)).where(col(Seat.id) == seat_id)
            )
        ).one()
    return row[0], row[1]


HAND_EDITS = [
    pytest.param("email", "bob@example.com", id="email"),
    pytest.param("email", None, id="email-to-null"),
    pytest.param("member_name", "Ann", id="member_name-from-null"),
    pytest.param("status", "revoked", id="status"),
    pytest.param("modified_at", T0 + timedelta(hours=1), id="modified_at"),
    pytest.param("seat_metadata", {"team": "b", "level": 1}, id="seat_metadata"),
]


@pytest.mark.parametrize(("column", "value"), HAND_EDITS)
async def test_a_hand_edit_of_a_polar_column_clears_the_digest(
    engine: AsyncEngine, seat: str, column: str, value: Any
) -> None:
    await set_values(engine, seat, **{column: value})

    assert await stored(engine, seat, column) == (value, None)


async def test_a_hand_edit_of_the_seat_id_clears_the_digest(engine: AsyncEngine, seat: str) -> None:
    await set_values(engine, seat, id="seat-2")

    assert await stored(engine, "seat-2", "id") == ("seat-2", None)


@pytest.mark.parametrize(("column", "value"), HAND_EDITS)
async def test_a_write_with_a_new_digest_keeps_it(
    engine: AsyncEngine, seat: str, column: str, value: Any
) -> None:
    await set_values(engine, seat, **{column: value}, polar_digest=NEW_DIGEST)

    assert await stored(engine, seat, column) == (value, NEW_DIGEST)


@pytest.mark.parametrize("column", ["gone_at", "synced_at"])
async def test_an_update_of_our_own_columns_keeps_the_digest(
    engine: AsyncEngine, seat: str, column: str
) -> None:
    later = T0 + timedelta(days=1)

    await set_values(engine, seat, **{column: later})

    assert await stored(engine, seat, column) == (later, DIGEST)


async def test_an_update_of_only_the_digest_keeps_the_new_digest(
    engine: AsyncEngine, seat: str
) -> None:
    await set_values(engine, seat, polar_digest=NEW_DIGEST)

    assert await stored(engine, seat, "id") == (seat, NEW_DIGEST)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("email", "ann@example.com"),
        ("modified_at", T0),
        ("seat_metadata", {"team": "a", "level": 1}),
    ],
)
async def test_an_update_to_the_same_value_keeps_the_digest(
    engine: AsyncEngine, seat: str, column: str, value: Any
) -> None:
    await set_values(engine, seat, **{column: value})

    assert await stored(engine, seat, column) == (value, DIGEST)
