"""seat polar digest

`seat.polar_digest` holds an 8-byte digest of Polar's columns as seat-sync last wrote them,
so that a resync which changes nothing compares one value per row instead of every column.

The mirror still overwrites a row someone edited by hand ("Read, don't write" in
docs/schema.md): the trigger `seat_polar_digest_guard` clears the digest whenever an UPDATE
changes a Polar column but leaves the digest as it was, which is what every writer but
seat-sync does. A NULL digest makes the next sync compare that row in full and repair it.
Updates of our own columns only (`gone_at`, `synced_at`) and updates that write a new digest
(seat-sync's own) keep the digest they leave. SQLite cannot assign to NEW, so its trigger
runs after the update and nulls the column with a second one; PostgreSQL nulls NEW before
the row is written.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The seat columns Polar owns, as of this revision (worker/sync/reconcile.py POLAR_COLUMNS
# plus the id). Inlined: a migration must not change when later code does.
POLAR_COLUMNS = (
    "id",
    "created_at",
    "modified_at",
    "subscription_id",
    "order_id",
    "status",
    "customer_id",
    "member_id",
    "email",
    "customer_email",
    "invitation_token_expires_at",
    "claimed_at",
    "revoked_at",
    "seat_metadata",
    "member_created_at",
    "member_modified_at",
    "member_customer_id",
    "member_email",
    "member_name",
    "member_external_id",
    "member_role",
)


def _sqlite_guard() -> str:
    changed = " OR ".join(f"NEW.{column} IS NOT OLD.{column}" for column in POLAR_COLUMNS)
    return f"""
        CREATE TRIGGER seat_polar_digest_guard AFTER UPDATE ON seat FOR EACH ROW
        WHEN NEW.polar_digest IS NOT NULL AND NEW.polar_digest IS OLD.polar_digest
            AND ({changed})
        BEGIN
            UPDATE seat SET polar_digest = NULL WHERE id = NEW.id;
        END
        """  # noqa: S608 - joined from the constant column names above


def _postgresql_changed(column: str) -> str:
    # json has no equality operator: compare its text (a respelling counts as a change).
    cast = "::text" if column == "seat_metadata" else ""
    return f"NEW.{column}{cast} IS DISTINCT FROM OLD.{column}{cast}"


def _postgresql_guard() -> str:
    changed = " OR ".join(_postgresql_changed(column) for column in POLAR_COLUMNS)
    return f"""
        CREATE FUNCTION seat_polar_digest_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.polar_digest IS NOT NULL
                AND NEW.polar_digest IS NOT DISTINCT FROM OLD.polar_digest
                AND ({changed})
            THEN
                NEW.polar_digest := NULL;
            END IF;
            RETURN NEW;
        END
        $$
        """


def upgrade() -> None:
    with op.batch_alter_table("seat", schema=None) as batch_op:
        batch_op.add_column(sa.Column("polar_digest", sa.LargeBinary(), nullable=True))

    if op.get_bind().dialect.name == "postgresql":
        op.execute(_postgresql_guard())
        # WHEN skips the function call for seat-sync's own writes, which change the digest.
        op.execute(
            "CREATE TRIGGER seat_polar_digest_guard BEFORE UPDATE ON seat FOR EACH ROW "
            "WHEN (NEW.polar_digest IS NOT NULL "
            "AND NEW.polar_digest IS NOT DISTINCT FROM OLD.polar_digest) "
            "EXECUTE FUNCTION seat_polar_digest_guard()"
        )
    else:
        op.execute(_sqlite_guard())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS seat_polar_digest_guard ON seat")
        op.execute("DROP FUNCTION IF EXISTS seat_polar_digest_guard()")
    else:
        op.execute("DROP TRIGGER IF EXISTS seat_polar_digest_guard")

    with op.batch_alter_table("seat", schema=None) as batch_op:
        batch_op.drop_column("polar_digest")
