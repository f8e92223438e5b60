"""The mirror's tables: the public, documented schema people and programs query.

Every change to these classes goes through an Alembic migration in worker/platform/migrations.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

SCOPE_KINDS = ("subscription", "order")
SEAT_STATUSES = ("pending", "claimed", "revoked")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class Seat(SQLModel, table=True):
    """One row per Polar seat slot (a seat id is a slot that Polar reuses)."""

    __tablename__ = "seat"
    __table_args__ = (
        Index("ix_seat_subscription_status", "subscription_id", "status"),
        Index("ix_seat_order_status", "order_id", "status"),
        Index("ix_seat_status_expires", "status", "invitation_token_expires_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    modified_at: datetime | None = _ts()
    subscription_id: str | None = Field(default=None, max_length=64)
    order_id: str | None = Field(default=None, max_length=64)
    status: str = Field(max_length=16)
    customer_id: str | None = Field(default=None, max_length=64, index=True)
    member_id: str | None = Field(default=None, max_length=64, index=True)
    email: str | None = Field(default=None, max_length=320, index=True)
    customer_email: str | None = Field(default=None, max_length=320)
    invitation_token_expires_at: datetime | None = _ts()
    claimed_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()
    seat_metadata: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # The nested `member` object, flattened; member is present when member_created_at is set
    # and its id is member_id.
    member_created_at: datetime | None = _ts()
    member_modified_at: datetime | None = _ts()
    member_customer_id: str | None = Field(default=None, max_length=64)
    member_email: str | None = Field(default=None, max_length=320, index=True)
    member_name: str | None = Field(default=None, sa_column=Column(Text))
    member_external_id: str | None = Field(default=None, sa_column=Column(Text))
    member_role: str | None = Field(default=None, max_length=32)
    # Ours, not Polar's.
    gone_at: datetime | None = _ts()
    synced_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    # 8-byte digest of Polar's columns as seat-sync last wrote them, so a resync can skip an
    # unchanged row; the seat_polar_digest_guard trigger nulls it when anyone else edits one.
    polar_digest: bytes | None = Field(default=None, sa_column=Column(LargeBinary))


class SeatScope(SQLModel, table=True):
    """One subscription or order whose seats we mirror."""

    __tablename__ = "seat_scope"

    kind: str = Field(primary_key=True, max_length=16)
    scope_id: str = Field(primary_key=True, max_length=64)
    total_seats: int | None = None
    available_seats: int | None = None
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    last_synced_at: datetime | None = _ts()
    # Start time of the fetch behind the stored state: an older fetch never overwrites it.
    last_fetch_started_at: datetime | None = _ts()
    last_attempt_at: datetime | None = _ts()
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    consecutive_failures: int = 0
    gone_at: datetime | None = _ts()
    # Digest of the last list answer's body and of its seats' digests (migration 0005): a
    # resync of the same body checks the stored seat digests instead of every seat.
    list_digest: bytes | None = Field(default=None, sa_column=Column(LargeBinary))


class SeatChange(SQLModel, table=True):
    """Append-only history: one row per observed change of a seat's status or holder."""

    __tablename__ = "seat_change"
    __table_args__ = (Index("ix_seat_change_seat_observed", "seat_id", "observed_at"),)

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    seat_id: str = Field(max_length=64)
    scope_kind: str = Field(max_length=16)
    scope_id: str = Field(max_length=64, index=True)
    observed_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    change: str = Field(max_length=16)  # created | status | holder | gone | returned
    old_status: str | None = Field(default=None, max_length=16)
    new_status: str | None = Field(default=None, max_length=16)
    old_email: str | None = Field(default=None, sa_column=Column(String(320), index=True))
    new_email: str | None = Field(default=None, sa_column=Column(String(320), index=True))
    old_member_id: str | None = Field(default=None, max_length=64)
    new_member_id: str | None = Field(default=None, max_length=64)
    old_customer_id: str | None = Field(default=None, max_length=64)
    new_customer_id: str | None = Field(default=None, max_length=64)
    polar_modified_at: datetime | None = _ts()
    sync_run_id: int | None = Field(default=None, index=True)


class SyncRun(SQLModel, table=True):
    """What one sync did: a single scope, or a full pass over every scope."""

    __tablename__ = "sync_run"

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    kind: str = Field(max_length=16, index=True)  # scope | full
    trigger: str = Field(default="manual", max_length=16)  # webhook | cron | cli | sweep | manual
    scope_kind: str | None = Field(default=None, max_length=16)
    scope_id: str | None = Field(default=None, max_length=64, index=True)
    status: str = Field(default="running", max_length=16)  # running | ok | failed | skipped
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    finished_at: datetime | None = _ts()
    api_calls: int = 0
    scopes_seen: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    gone: int = 0
    errors: int = 0
    error: str | None = Field(default=None, sa_column=Column(Text))
    job_id: str | None = Field(default=None, max_length=128)
    # Full passes only: where discovery stopped (JSON), so a killed pass resumes.
    progress: str | None = Field(default=None, sa_column=Column(Text))
    heartbeat_at: datetime | None = _ts()


class ResyncItem(SQLModel, table=True):
    """One scope a full pass must sync; `done_at` set when it was synced (or skipped)."""

    __tablename__ = "resync_item"
    __table_args__ = (Index("ix_resync_item_open", "run_id", "done_at"),)

    run_id: int = Field(primary_key=True)
    kind: str = Field(primary_key=True, max_length=16)
    scope_id: str = Field(primary_key=True, max_length=64)
    done_at: datetime | None = _ts()
    outcome: str | None = Field(default=None, max_length=16)  # ok | stale | skipped | gone | failed


class InvitationReminder(SQLModel, table=True):
    """One resend per invitation: the row is claimed before the call, so never twice."""

    __tablename__ = "invitation_reminder"
    __table_args__ = (
        UniqueConstraint("seat_id", "invitation_expires_at", name="uq_reminder_invitation"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    seat_id: str = Field(max_length=64, index=True)
    scope_kind: str = Field(max_length=16)
    scope_id: str = Field(max_length=64)
    recipient: str = Field(max_length=320)
    invitation_expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    sent_at: datetime | None = _ts()
    # sending | sent | not_pending | invalid_token | failed | unknown
    outcome: str = Field(default="sending", max_length=16)
    error: str | None = Field(default=None, sa_column=Column(Text))


class InvitationRenewal(SQLModel, table=True):
    """Revoke + assign again for an expired invitation; the intent is recorded first."""

    __tablename__ = "invitation_renewal"
    __table_args__ = (
        UniqueConstraint("seat_id", "old_expires_at", name="uq_renewal_invitation"),
        Index("ix_renewal_recipient", "scope_kind", "scope_id", "recipient"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    seat_id: str = Field(max_length=64, index=True)
    scope_kind: str = Field(max_length=16)
    scope_id: str = Field(max_length=64)
    recipient: str = Field(max_length=320)
    seat_metadata: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    old_expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    # intent -> revoked -> assigned | slot_taken | failed
    state: str = Field(default="intent", max_length=16, index=True)
    new_seat_id: str | None = Field(default=None, max_length=64)
    new_expires_at: datetime | None = _ts()
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    error: str | None = Field(default=None, sa_column=Column(Text))


class WebhookDelivery(SQLModel, table=True):
    """The durable inbox: every verified webhook, committed before we answer 2xx."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_pending", "processed_at", "received_at"),)

    webhook_id: str = Field(primary_key=True, max_length=255)
    event_type: str = Field(max_length=64, index=True)
    event_timestamp: datetime | None = _ts()
    payload: str = Field(sa_column=Column(Text, nullable=False))
    received_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    routed_at: datetime | None = _ts()
    processed_at: datetime | None = _ts()
    outcome: str | None = Field(default=None, max_length=32)  # synced | ignored | failed
    error: str | None = Field(default=None, sa_column=Column(Text))


class WebhookDeliveryScope(SQLModel, table=True):
    """Which scopes a delivery asks to sync; done when a fetch that began after receipt lands."""

    __tablename__ = "webhook_delivery_scope"
    __table_args__ = (Index("ix_delivery_scope_pending", "scope_kind", "scope_id", "processed_at"),)

    webhook_id: str = Field(primary_key=True, max_length=255)
    scope_kind: str = Field(primary_key=True, max_length=16)
    scope_id: str = Field(primary_key=True, max_length=64)
    received_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    processed_at: datetime | None = _ts()
    sync_run_id: int | None = None


def seat_json(seat: Seat) -> dict[str, Any]:
    """The seat as Polar's CustomerSeat object (every key), for JSON output."""

    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")

    member: dict[str, Any] | None = None
    if seat.member_created_at is not None:
        member = {
            "id": seat.member_id,
            "created_at": iso(seat.member_created_at),
            "modified_at": iso(seat.member_modified_at),
            "customer_id": seat.member_customer_id,
            "email": seat.member_email,
            "name": seat.member_name,
            "external_id": seat.member_external_id,
            "role": seat.member_role,
        }
    return {
        "id": seat.id,
        "created_at": iso(seat.created_at),
        "modified_at": iso(seat.modified_at),
        "subscription_id": seat.subscription_id,
        "order_id": seat.order_id,
        "status": seat.status,
        "customer_id": seat.customer_id,
        "member_id": seat.member_id,
        "member": member,
        "email": seat.email,
        "customer_email": seat.customer_email,
        "invitation_token_expires_at": iso(seat.invitation_token_expires_at),
        "claimed_at": iso(seat.claimed_at),
        "revoked_at": iso(seat.revoked_at),
        "seat_metadata": seat.seat_metadata,
    }
