"""scope list digest

`seat_scope.list_digest` lets a resync of an unchanged list skip converting and comparing
its seats: 20 bytes of SHA-1 over the body of Polar's last list answer (exactly as it
came), then 20 bytes of SHA-1 over that list's seat digests (`seat.polar_digest`) in list
order. A resync whose body has the same digest compares only the stored seat digests
with the second half (a row edited by anyone else has a NULL digest, so it no longer
matches) and writes no seat. Null until the first sync of a list read from a body.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("seat_scope", schema=None) as batch_op:
        batch_op.add_column(sa.Column("list_digest", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("seat_scope", schema=None) as batch_op:
        batch_op.drop_column("list_digest")
