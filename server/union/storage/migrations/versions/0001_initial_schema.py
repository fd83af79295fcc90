"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "banks",
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("english_name", sa.String(length=128), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_banks")),
    )
    op.create_table(
        "counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )
    op.create_table(
        "identities",
        sa.Column("person_hash", sa.String(length=64), nullable=False),
        sa.Column("name_hash", sa.String(length=64), nullable=False),
        sa.Column("mobile_hash", sa.String(length=64), nullable=False),
        sa.Column("region_code", sa.String(length=6), nullable=False),
        sa.PrimaryKeyConstraint("person_hash", name=op.f("pk_identities")),
    )
    op.create_table(
        "lookups",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("person_hash", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("region_code", sa.String(length=6), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("complete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sealed_identity", sa.String(length=1024), nullable=True),
        sa.Column("report_id", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lookups")),
        sa.UniqueConstraint("person_hash", "request_id", name=op.f("uq_lookups_person_hash_request_id")),
    )
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lookups_person_hash"), ["person_hash"], unique=False)
        batch_op.create_index("ix_lookups_state_deadline", ["state", "deadline_time"], unique=False)

    op.create_table(
        "regions",
        sa.Column("code", sa.String(length=6), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("open", sa.Boolean(), nullable=False),
        sa.Column("open_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_regions")),
    )
    op.create_table(
        "reports",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("lookup_id", sa.String(length=40), nullable=False),
        sa.Column("person_hash", sa.String(length=64), nullable=False),
        sa.Column("generate_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reports")),
        sa.UniqueConstraint("lookup_id", name=op.f("uq_reports_lookup_id")),
    )
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reports_expire_time"), ["expire_time"], unique=False)
        batch_op.create_index("ix_reports_person_generated", ["person_hash", "generate_time"], unique=False)

    op.create_table(
        "verifications",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("person_hash", sa.String(length=64), nullable=False),
        sa.Column("region_code", sa.String(length=6), nullable=False),
        sa.Column("sealed_identity", sa.String(length=1024), nullable=True),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failed_attempts", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verifications")),
    )
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_verifications_person_hash"), ["person_hash"], unique=False)

    op.create_table(
        "verified_people",
        sa.Column("person_hash", sa.String(length=64), nullable=False),
        sa.Column("first_verify_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("person_hash", name=op.f("pk_verified_people")),
    )
    op.create_table(
        "bank_tasks",
        sa.Column("lookup_id", sa.String(length=40), nullable=False),
        sa.Column("bank_code", sa.String(length=16), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("bank_name", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("attempt_count", sa.Integer(), nullable=False),
        sa.Column("next_attempt_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("card_count", sa.Integer(), nullable=False),
        sa.Column("debit_count", sa.Integer(), nullable=False),
        sa.Column("credit_count", sa.Integer(), nullable=False),
        sa.Column("failure_reason", sa.String(length=255), nullable=False),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["lookup_id"], ["lookups.id"], name=op.f("fk_bank_tasks_lookup_id_lookups"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("lookup_id", "bank_code", name=op.f("pk_bank_tasks")),
    )
    with op.batch_alter_table("bank_tasks", schema=None) as batch_op:
        batch_op.create_index("ix_bank_tasks_due", ["outcome", "next_attempt_time"], unique=False)

    op.create_table(
        "found_cards",
        sa.Column("lookup_id", sa.String(length=40), nullable=False),
        sa.Column("card_ref", sa.String(length=40), nullable=False),
        sa.Column("bank_code", sa.String(length=16), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("bank_card_ref", sa.String(length=128), nullable=False),
        sa.Column("card_type", sa.String(length=8), nullable=False),
        sa.Column("first_four", sa.String(length=4), nullable=False),
        sa.Column("last_four", sa.String(length=4), nullable=False),
        sa.Column("number_length", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["lookup_id"], ["lookups.id"], name=op.f("fk_found_cards_lookup_id_lookups"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("lookup_id", "card_ref", name=op.f("pk_found_cards")),
    )


def downgrade() -> None:
    op.drop_table("found_cards")
    with op.batch_alter_table("bank_tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_bank_tasks_due")

    op.drop_table("bank_tasks")
    op.drop_table("verified_people")
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_verifications_person_hash"))

    op.drop_table("verifications")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_index("ix_reports_person_generated")
        batch_op.drop_index(batch_op.f("ix_reports_expire_time"))

    op.drop_table("reports")
    op.drop_table("regions")
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.drop_index("ix_lookups_state_deadline")
        batch_op.drop_index(batch_op.f("ix_lookups_person_hash"))

    op.drop_table("lookups")
    op.drop_table("identities")
    op.drop_table("counters")
    op.drop_table("banks")
