"""change feed order

seat_change ids become visible in increasing order on PostgreSQL too, so that a consumer
of the change feed that asks for the rows after the last id it saw never misses one.

PostgreSQL draws an id from the sequence when a row is inserted, long before its
transaction commits: two transactions can commit out of id order, and a reader polling
`id > last` in between would step over the lower id for ever. A statement trigger makes
every transaction that inserts seat_change rows take one advisory lock before its ids are
drawn (BEFORE STATEMENT fires before any row's default is evaluated) and hold it until it
commits or rolls back. So whoever holds a lower id has ended before a higher id is drawn;
a row is visible only when every lower id that will ever be is. The lock is held from a
sync's history insert to its commit (a few milliseconds), and only by syncs that recorded
a change. SQLite needs nothing: it has one writer at a time.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 23:59:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# pg_advisory_xact_lock's key: any constant no other lock of this database uses.
FEED_LOCK_KEY = 5_134_820_730_013


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION seat_change_feed_order() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock({FEED_LOCK_KEY});
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER seat_change_feed_order BEFORE INSERT ON seat_change "
        "FOR EACH STATEMENT EXECUTE FUNCTION seat_change_feed_order()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS seat_change_feed_order ON seat_change")
    op.execute("DROP FUNCTION IF EXISTS seat_change_feed_order()")
