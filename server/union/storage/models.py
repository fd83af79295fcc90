"""The union's tables (SQLAlchemy 2 typed models). Alembic migrations mirror these.

Privacy by construction: no column can hold a card number or a resident ID
number in the clear. People are keyed by `person_hash` (a keyed HMAC of the ID
number); the ID number needed for the fan-out lives only in `sealed_identity`
(AES-GCM ciphertext), which is erased when the verification or lookup ends.
Cards are stored as first 4 + last 4 digits and a length.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite has no time zones of its own)."""

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
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Timestamp = UtcDateTime()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class RegionRow(Base):
    __tablename__ = "regions"

    code: Mapped[str] = mapped_column(String(6), primary_key=True)
    name: Mapped[str] = mapped_column(String(32))
    open: Mapped[bool] = mapped_column(Boolean, default=False)
    open_time: Mapped[datetime | None] = mapped_column(Timestamp)
    # The pilot batch that opened the region (1: Dec 2021, 2: Mar 2022) and that batch's opening
    # day; NULL for regions outside the pilot. Facts of the service's history: operators' opening
    # and closing change `open`, never these.
    pilot_batch: Mapped[int | None] = mapped_column(Integer)
    pilot_open_date: Mapped[date | None] = mapped_column(Date)


class BankRow(Base):
    __tablename__ = "banks"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    english_name: Mapped[str] = mapped_column(String(128))
    address: Mapped[str] = mapped_column(String(255))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # CNAPS code; NULL only for rows made before it was kept (migration 0006 fills the 16).
    # Unique: two banks joining at once with one CNAPS code cannot both get it (create_bank's
    # check alone would let them on PostgreSQL).
    interbank_code: Mapped[str | None] = mapped_column(String(3), unique=True)
    # The DNS name the bank's certificate must carry; NULL means shapes.bank_tls_name(code).
    tls_name: Mapped[str | None] = mapped_column(String(253))


class IdentityRow(Base):
    """The simulated national identity registry: hashes only, enough to check a claim."""

    __tablename__ = "identities"

    person_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name_hash: Mapped[str] = mapped_column(String(64))
    mobile_hash: Mapped[str] = mapped_column(String(64))
    region_code: Mapped[str] = mapped_column(String(6))


class VerificationRow(Base):
    __tablename__ = "verifications"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    person_hash: Mapped[str] = mapped_column(String(64), index=True)
    region_code: Mapped[str] = mapped_column(String(6))
    # Name + ID number, AES-GCM sealed; erased once the verification completes or dies.
    sealed_identity: Mapped[str | None] = mapped_column(String(1024))
    code_hash: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(Timestamp, index=True)
    expire_time: Mapped[datetime] = mapped_column(Timestamp)
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[bool] = mapped_column(Boolean, default=False)


class VerifiedPersonRow(Base):
    """One row per person who ever completed verification (for statistics)."""

    __tablename__ = "verified_people"

    person_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_verify_time: Mapped[datetime] = mapped_column(Timestamp)


class LookupRow(Base):
    __tablename__ = "lookups"
    __table_args__ = (
        # Also the index for every query by person_hash alone (its first column).
        UniqueConstraint("person_hash", "request_id"),
        Index("ix_lookups_state_deadline", "state", "deadline_time"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    person_hash: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    region_code: Mapped[str] = mapped_column(String(6))
    state: Mapped[str] = mapped_column(String(16))  # "running" | "completed"
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    deadline_time: Mapped[datetime] = mapped_column(Timestamp)
    complete_time: Mapped[datetime | None] = mapped_column(Timestamp)
    # Name + ID number for the fan-out, AES-GCM sealed; NULL once the lookup is final.
    sealed_identity: Mapped[str | None] = mapped_column(String(1024))
    report_id: Mapped[str | None] = mapped_column(String(40))
    # The mobile number for the report-ready SMS, sealed; moved to the notification outbox when final.
    sealed_contact: Mapped[str | None] = mapped_column(String(512))
    # A digest of what was asked (the banks chosen), so a retry with the same request_id but a
    # different request is refused (AIP-155). request_id itself holds a keyed hash, never the text.
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    # The participating banks this lookup does not ask and why (JSON: bank codes, names, reasons,
    # catalogue facts only); deleted with the lookup.
    unasked_banks: Mapped[str | None] = mapped_column(Text)


class BankTaskRow(Base):
    """One bank's part of one lookup: the unit of durable, resumable work."""

    __tablename__ = "bank_tasks"
    __table_args__ = (Index("ix_bank_tasks_due", "outcome", "next_attempt_time"),)

    lookup_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("lookups.id", ondelete="CASCADE"), primary_key=True
    )
    bank_code: Mapped[str] = mapped_column(String(16), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    bank_name: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # pending | answered | failed | no_response
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_time: Mapped[datetime] = mapped_column(Timestamp)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    card_count: Mapped[int] = mapped_column(Integer, default=0)
    debit_count: Mapped[int] = mapped_column(Integer, default=0)
    credit_count: Mapped[int] = mapped_column(Integer, default=0)
    failure_reason: Mapped[str] = mapped_column(String(255), default="")
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    update_time: Mapped[datetime] = mapped_column(Timestamp)


class FoundCardRow(Base):
    """A masked card a bank reported for a lookup; the report's card rows."""

    __tablename__ = "found_cards"

    lookup_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("lookups.id", ondelete="CASCADE"), primary_key=True
    )
    card_ref: Mapped[str] = mapped_column(String(40), primary_key=True)
    bank_code: Mapped[str] = mapped_column(String(16))
    position: Mapped[int] = mapped_column(Integer)
    bank_card_ref: Mapped[str] = mapped_column(String(128))
    card_type: Mapped[str] = mapped_column(String(8))  # debit | credit
    first_four: Mapped[str] = mapped_column(String(4))
    last_four: Mapped[str] = mapped_column(String(4))
    number_length: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # active | dormant | frozen
    # When the bank opened the card (NULL if it did not say, and for cards found before 0006).
    open_time: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class ReportRow(Base):
    __tablename__ = "reports"
    __table_args__ = (Index("ix_reports_person_generated", "person_hash", "generate_time"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Unique: a lookup yields exactly one report, even if two replicas race to finalise it.
    lookup_id: Mapped[str] = mapped_column(String(40), unique=True)
    person_hash: Mapped[str] = mapped_column(String(64))
    generate_time: Mapped[datetime] = mapped_column(Timestamp)
    expire_time: Mapped[datetime] = mapped_column(Timestamp, index=True)


class CounterRow(Base):
    """Monotonic service counters (reports generated survive report purges)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class CardClosureRow(Base):
    """A person's request to close cards of one report (its items are card_actions rows)."""

    __tablename__ = "card_closures"
    # Also the index for listing a person's closures (its first column).
    __table_args__ = (UniqueConstraint("person_hash", "request_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    person_hash: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    report_id: Mapped[str] = mapped_column(String(40))
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))


class CardActionRow(Base):
    """One card's closure or "not mine" flag: durable, resumable work like a bank task.

    Keeps its own copy of the card's masked parts, so the person can still see
    what was asked after the report itself has expired or been deleted.
    """

    __tablename__ = "card_actions"
    __table_args__ = (
        Index("ix_card_actions_due", "state", "next_attempt_time"),
        Index("ix_card_actions_update_time", "update_time"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # close | flag
    closure_id: Mapped[str | None] = mapped_column(String(40), index=True)
    # "lookup_id:card_ref" for flags, so a card is flagged at most once; NULL for closures.
    flag_key: Mapped[str | None] = mapped_column(String(96), unique=True)
    # A flag's (person, request_id) as a keyed hash: unique, so two flags can never share a
    # request_id (closure items share theirs and leave it NULL).
    flag_request: Mapped[str | None] = mapped_column(String(64), unique=True)
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    person_hash: Mapped[str] = mapped_column(String(64), index=True)
    lookup_id: Mapped[str] = mapped_column(String(40), index=True)
    position: Mapped[int] = mapped_column(Integer)
    card_ref: Mapped[str] = mapped_column(String(40))
    bank_code: Mapped[str] = mapped_column(String(16))
    bank_name: Mapped[str] = mapped_column(String(64))
    bank_card_ref: Mapped[str] = mapped_column(String(128))
    first_four: Mapped[str] = mapped_column(String(4))
    last_four: Mapped[str] = mapped_column(String(4))
    number_length: Mapped[int] = mapped_column(Integer)
    # pending | closed | scheduled | branch_visit_required | rejected | frozen | failed
    state: Mapped[str] = mapped_column(String(24))
    ticket: Mapped[str] = mapped_column(String(64), default="")  # ticket id or fraud case number
    reason: Mapped[str] = mapped_column(String(255), default="")
    # Name + ID number for the bank, AES-GCM sealed; NULL once the action is final.
    sealed_identity: Mapped[str | None] = mapped_column(String(1024))
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_time: Mapped[datetime] = mapped_column(Timestamp)
    deadline_time: Mapped[datetime] = mapped_column(Timestamp)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    create_time: Mapped[datetime] = mapped_column(Timestamp)
    update_time: Mapped[datetime] = mapped_column(Timestamp)


class AuditEventRow(Base):
    """Who did what, when, and how it ended: never a name, ID number or card number.

    Outlives the reports it mentions (no foreign keys on purpose)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_actor_time", "actor", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(Timestamp, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(48))
    outcome: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(96), default="")


class NotificationRow(Base):
    """Outbox of "your report is ready" messages: written with the report, sent, then deleted.

    Unique per lookup, so a report is announced once."""

    __tablename__ = "notifications"

    lookup_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    report_id: Mapped[str] = mapped_column(String(40))
    # The mobile number, AES-GCM sealed (context "contact:<lookup_id>").
    sealed_contact: Mapped[str] = mapped_column(String(512))
    create_time: Mapped[datetime] = mapped_column(Timestamp)


class QuotaSlotRow(Base):
    """One use of a rate limit: `key` (a keyed hash of what is limited, e.g. the phone a code goes
    to) may hold at most `limit` slots taken within the window. Taking one is a single conditional
    upsert (a free slot, or one whose time fell out of the window), so concurrent callers can never
    share a slot: exactly `limit` win on every backend. Rows older than the window are purged."""

    __tablename__ = "quota_slots"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(Timestamp, index=True)


class SessionRow(Base):
    """The one live session of each person, so that a session can be revoked.

    Completing a verification replaces the person's row (which revokes the older session);
    signing out clears `token_id`. A row is purged once the session it names would have expired
    anyway; a signed session with no row, or another token id, is revoked. Holds no PII: the
    person's keyed hash, a random token id, a time."""

    __tablename__ = "sessions"

    person_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[str | None] = mapped_column(String(32))  # NULL once signed out
    expire_time: Mapped[datetime] = mapped_column(Timestamp, index=True)


class AdminCredentialRow(Base):
    """A named operator credential with a role; the token itself is never stored, only its keyed
    hash (HMAC under the keyring key `key_id`). Kept until an operator revokes it (deletes the row);
    the audit trail names credentials by `id`, so it outlives them."""

    __tablename__ = "admin_credentials"

    id: Mapped[str] = mapped_column(String(24), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer | operator
    key_id: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    create_time: Mapped[datetime] = mapped_column(Timestamp)


class BankCooldownRow(Base):
    """When a bank last answered a person whose report is gone: deleting a report takes its lookup,
    but not the re-query cooldown that lookup started. Holds the person's keyed hash, a bank code
    and two times; purged when the cooldown ends (`until`)."""

    __tablename__ = "bank_cooldowns"

    person_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    bank_code: Mapped[str] = mapped_column(String(16), primary_key=True)
    answer_time: Mapped[datetime] = mapped_column(Timestamp)
    until: Mapped[datetime] = mapped_column(Timestamp, index=True)
