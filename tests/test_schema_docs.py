"""The docs stay true: docs/schema.md's example queries give the right answers on SQLite
and PostgreSQL, it describes every table, column and index of the models, and
deploy/env.example lists every setting."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    insert,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from worker.config import Settings
from worker.models import InvitationReminder, Seat, SeatChange, UTCDateTime
from worker.platform.db import create_engine, is_sqlite

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "schema.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
ENV_EXAMPLE = DOC_PATH.parent.parent / "deploy" / "env.example"
QUERY_NAMES = {"seats_per_customer", "invitations_expiring", "lost_access"}


# ---------------------------------------------------------------------- reading the doc


def fenced_blocks(lang: str) -> list[str]:
    """The bodies of the ```lang blocks, unindented (blocks may sit inside list items)."""
    blocks = []
    for match in re.finditer(rf"^([ \t]*)```{re.escape(lang)}\n(.*?)^\1```$", DOC, re.M | re.S):
        indent = len(match.group(1))
        blocks.append("\n".join(line[indent:] for line in match.group(2).splitlines()))
    return blocks


def doc_queries() -> dict[str, str]:
    queries = {}
    for block in fenced_blocks("sql"):
        found = re.match(r"-- name: (\w+)\n", block)
        assert found, f"a ```sql block in {DOC_PATH.name} does not start with '-- name: …'"
        queries[found.group(1)] = block
    return queries


def psql_recipe() -> dict[str, str]:
    """`\\set name 'value'` lines: psql pastes the value in place of `:name`."""
    (block,) = fenced_blocks("psql")
    return {
        name: value.replace("''", "'")
        for name, value in re.findall(r"^\\set (\w+) '(.*)'$", block, re.M)
    }


def sqlite3_recipe() -> dict[str, str]:
    """`.parameter set :name "expression"` lines: the shell binds the expression's value."""
    (block,) = fenced_blocks("sqlite3")
    return {
        name: f"({expr})"
        for name, expr in re.findall(r'^\.parameter set :(\w+) "(.*)"$', block, re.M)
    }


def documented_tables() -> dict[str, dict[str, tuple[str, str]]]:
    """table -> column -> (type, null) from each "### `table`" section's column table."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    for section in re.split(r"^### ", DOC, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        name = re.fullmatch(r"`(\w+)`", heading.strip())
        if name is None:
            continue
        rows = body.split("| column |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
        columns = {}
        for row in rows:
            cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
            columns[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
        tables[name.group(1)] = columns
    return tables


def doc_type(column: Any) -> str:
    """How the doc writes a column's type (see its "Types" table)."""
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return "timestamp"
    if isinstance(kind, TypeDecorator):  # SQLModel's AutoString
        kind = kind.impl_instance
    if isinstance(kind, JSON):
        return "json"
    if isinstance(kind, LargeBinary):
        return "bytes"
    if isinstance(kind, BigInteger):
        return "bigint id"
    if isinstance(kind, Integer):
        return "int"
    if isinstance(kind, Text) or (isinstance(kind, String) and kind.length is None):
        return "text"
    if isinstance(kind, String):
        return f"text({kind.length})"
    raise AssertionError(f"no documented spelling for {column.table.name}.{column.name}: {kind!r}")


# ---------------------------------------------------------------------- a known mirror

NOW = datetime.now(UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def seat(seat_id: str, status: str, customer: str | None, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": seat_id,
        "created_at": NOW - 3 * DAY,
        "subscription_id": "sub_1",
        "order_id": None,
        "status": status,
        "customer_id": customer,
        "customer_email": f"billing@{customer}.example" if customer else None,
        "email": f"{seat_id}@example.com" if status != "revoked" else None,
        "member_email": None,
        "invitation_token_expires_at": None,
        "gone_at": None,
        "synced_at": NOW,
    }
    assert set(values) <= set(row)  # one executemany needs the same keys in every row
    row.update(values)
    return row


SEATS = [
    seat("a1", "claimed", "cus_a", invitation_token_expires_at=NOW - 10 * HOUR),
    seat("a2", "claimed", "cus_a"),
    seat("a3", "pending", "cus_a", invitation_token_expires_at=NOW + 3 * HOUR),
    seat("a4", "claimed", "cus_a", gone_at=NOW - DAY),
    seat("b1", "pending", "cus_b", invitation_token_expires_at=NOW + 30 * HOUR),
    seat("b2", "pending", "cus_b", invitation_token_expires_at=NOW - HOUR),
    seat("b3", "claimed", "cus_b", invitation_token_expires_at=NOW + 2 * HOUR),
    seat(
        "b4",
        "pending",
        "cus_b",
        email=None,
        member_email="b4.member@example.com",
        invitation_token_expires_at=NOW + 5 * HOUR,
        subscription_id=None,
        order_id="ord_1",
    ),
    seat("c1", "pending", "cus_c", invitation_token_expires_at=NOW + 2 * HOUR, gone_at=NOW),
    seat("r1", "revoked", None, invitation_token_expires_at=NOW + HOUR),
    seat("r2", "revoked", None),
]


def reminder(seat_id: str, expires_at: datetime, outcome: str) -> dict[str, Any]:
    return {
        "seat_id": seat_id,
        "scope_kind": "subscription",
        "scope_id": "sub_1",
        "recipient": f"{seat_id}@example.com",
        "invitation_expires_at": expires_at,
        "created_at": NOW - HOUR,
        "outcome": outcome,
    }


REMINDERS = [
    reminder("a3", NOW + 3 * HOUR, "sent"),
    # An earlier invitation on the same slot: must not show up against the current one.
    reminder("a3", NOW - 2 * DAY, "unknown"),
    reminder("b2", NOW - HOUR, "sent"),
]


def change(
    seat_id: str,
    kind: str,
    ago: timedelta,
    old: tuple[str | None, str | None, str | None],
    new: tuple[str | None, str | None, str | None],
) -> dict[str, Any]:
    """old/new = (status, email, member_id)."""
    return {
        "seat_id": seat_id,
        "scope_kind": "subscription",
        "scope_id": "sub_1",
        "observed_at": NOW - ago,
        "change": kind,
        "old_status": old[0],
        "old_email": old[1],
        "old_member_id": old[2],
        "new_status": new[0],
        "new_email": new[1],
        "new_member_id": new[2],
    }


NOBODY: tuple[str | None, str | None, str | None] = (None, None, None)
CHANGES = [
    # First sighting: nobody held it before.
    change("a1", "created", 2 * DAY, NOBODY, ("claimed", "a1@example.com", "mem_a1")),
    # Revoked this week: lost.
    change("r1", "status", DAY, ("claimed", "lost@example.com", "mem_l"), ("revoked", None, None)),
    # Revoked ten days ago: not this week.
    change(
        "r2",
        "status",
        10 * DAY,
        ("claimed", "longago@example.com", "mem_o"),
        ("revoked", None, None),
    ),
    # Same status, another member: the slot was reassigned between two syncs.
    change(
        "a2",
        "holder",
        2 * DAY,
        ("claimed", "swapped@example.com", "mem_s"),
        ("claimed", "a2@example.com", "mem_a2"),
    ),
    # Same member, new e-mail: not a loss.
    change(
        "a1",
        "holder",
        3 * DAY,
        ("claimed", "a1.old@example.com", "mem_a1"),
        ("claimed", "a1@example.com", "mem_a1"),
    ),
    # Invitation accepted: not a loss.
    change(
        "a3",
        "status",
        HOUR,
        ("pending", "a3@example.com", "mem_a3"),
        ("claimed", "a3@example.com", "mem_a3"),
    ),
    # Left Polar's list with its holder: not counted as a loss.
    change(
        "a4",
        "gone",
        HOUR,
        ("claimed", "a4@example.com", "mem_a4"),
        ("claimed", "a4@example.com", "mem_a4"),
    ),
    # Invitation withdrawn before it was accepted: lost.
    change(
        "b2",
        "status",
        5 * HOUR,
        ("pending", "withdrawn@example.com", None),
        ("revoked", None, None),
    ),
    # Claimed seat now pending for someone else (no member yet): lost.
    change(
        "b3",
        "status",
        6 * HOUR,
        ("claimed", "replaced@example.com", "mem_r"),
        ("pending", "b3@example.com", None),
    ),
    # A revoked slot given to someone new: nobody lost anything.
    change("b1", "status", 4 * HOUR, ("revoked", None, None), ("pending", "b1@example.com", None)),
]

PARAMS = {"now": NOW, "until": NOW + 6 * HOUR, "since": NOW - 7 * DAY}


@pytest.fixture
async def mirror(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(insert(Seat), SEATS)
        await conn.execute(insert(InvitationReminder), REMINDERS)
        await conn.execute(insert(SeatChange), CHANGES)
    try:
        yield engine
    finally:
        await engine.dispose()


async def run_query(engine: AsyncEngine, name: str, params: Mapping[str, Any] = PARAMS) -> Any:
    async with engine.connect() as conn:
        result = await conn.execute(text(doc_queries()[name]), dict(params))
        return [dict(row._mapping) for row in result]


async def run_as_cli(engine: AsyncEngine, name: str, database_url: str) -> Any:
    """The query as psql or sqlite3 runs it with the doc's parameter recipe."""
    recipe = sqlite3_recipe() if is_sqlite(database_url) else psql_recipe()
    sql = re.sub(r":(\w+)\b", lambda m: recipe[m.group(1)], doc_queries()[name])
    async with engine.connect() as conn:
        result = await conn.exec_driver_sql(sql)
        return [dict(row._mapping) for row in result]


# ---------------------------------------------------------------------- the queries


def test_doc_has_the_three_example_queries() -> None:
    assert set(doc_queries()) == QUERY_NAMES
    assert set(psql_recipe()) == set(sqlite3_recipe()) == set(PARAMS)


async def test_seats_per_customer_counts_current_seats_by_status(mirror: AsyncEngine) -> None:
    rows = await run_query(mirror, "seats_per_customer")

    counts = [
        (r["customer_id"], r["pending"], r["claimed"], r["revoked"], r["seats"]) for r in rows
    ]
    assert counts == [
        ("cus_b", 3, 1, 0, 4),
        ("cus_a", 1, 2, 0, 3),  # a4 is gone from Polar's list
        (None, 0, 0, 2, 2),  # revoked slots have no customer
    ]
    assert rows[0]["customer_email"] == "billing@cus_b.example"


async def test_invitations_expiring_lists_pending_seats_in_the_window(
    mirror: AsyncEngine,
) -> None:
    rows = await run_query(mirror, "invitations_expiring")

    # Not b1 (30 h away), b2 (already expired), b3 (claimed), c1 (gone), r1 (revoked).
    assert [(r["seat_id"], r["invitee"], r["reminder"]) for r in rows] == [
        ("a3", "a3@example.com", "sent"),
        ("b4", "b4.member@example.com", None),
    ]
    assert rows[1]["order_id"] == "ord_1"


async def test_invitations_expiring_window_is_the_until_parameter(mirror: AsyncEngine) -> None:
    rows = await run_query(mirror, "invitations_expiring", {**PARAMS, "until": NOW + 4 * HOUR})

    assert [r["seat_id"] for r in rows] == ["a3"]


async def test_lost_access_lists_revoked_and_replaced_holders_this_week(
    mirror: AsyncEngine,
) -> None:
    rows = await run_query(mirror, "lost_access")

    assert [(r["email"], r["old_status"], r["new_status"]) for r in rows] == [
        ("swapped@example.com", "claimed", "claimed"),
        ("lost@example.com", "claimed", "revoked"),
        ("replaced@example.com", "claimed", "pending"),
        ("withdrawn@example.com", "pending", "revoked"),
    ]
    assert rows[0]["replaced_by"] == "a2@example.com"


@pytest.mark.parametrize("name", ["invitations_expiring", "lost_access"])
async def test_cli_parameter_recipe_gives_the_same_answer(
    mirror: AsyncEngine, database_url: str, name: str
) -> None:
    with_recipe = await run_as_cli(mirror, name, database_url)
    with_python = await run_query(mirror, name)

    assert [r["seat_id"] for r in with_recipe] == [r["seat_id"] for r in with_python]
    assert with_python


# ---------------------------------------------------------------------- the descriptions


def test_doc_describes_every_table_and_column_with_type_and_nullability() -> None:
    documented = documented_tables()

    assert set(documented) == set(SQLModel.metadata.tables)
    for name, table in SQLModel.metadata.tables.items():
        expected = {
            column.name: (doc_type(column), "yes" if column.nullable else "no")
            for column in table.columns
        }
        actual = {
            column: (kind, "yes" if null.startswith("yes") else "no")
            for column, (kind, null) in documented[name].items()
        }
        assert actual == expected, f"docs/schema.md is out of date for table {name}"


def test_doc_names_every_index_and_unique_constraint() -> None:
    names = {
        str(item.name)
        for table in SQLModel.metadata.tables.values()
        for item in [*table.indexes, *table.constraints]
        if isinstance(item, Index | UniqueConstraint) and item.name
    }

    assert names
    assert sorted(n for n in names if f"`{n}`" not in DOC) == []


def test_env_example_lists_every_setting_with_a_valid_value() -> None:
    values = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M))

    assert set(values) == {name.upper() for name in Settings.model_fields}
    Settings(**{name.lower(): value for name, value in values.items()})
