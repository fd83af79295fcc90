"""card actions, audit trail, notifications

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=48), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.String(length=96), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_actor_time", ["actor", "time"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_time"), ["time"], unique=False)

    op.create_table(
        "card_actions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("closure_id", sa.String(length=40), nullable=True),
        sa.Column("flag_key", sa.String(length=96), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("person_hash", sa.String(length=64), nullable=False),
        sa.Column("lookup_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("card_ref", sa.String(length=40), nullable=False),
        sa.Column("bank_code", sa.String(length=16), nullable=False),
        sa.Column("bank_name", sa.String(length=64), nullable=False),
        sa.Column("bank_card_ref", sa.String(length=128), nullable=False),
        sa.Column("first_four", sa.String(length=4), nullable=False),
        sa.Column("last_four", sa.String(length=4), nullable=False),
        sa.Column("number_length", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("ticket", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=False),
        sa.Column("sealed_identity", sa.String(length=1024), nullable=True),
        sa.Column("attempt_count", sa.Integer(), nullable=False),
        sa.Column("next_attempt_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_card_actions")),
        sa.UniqueConstraint("flag_key", name=op.f("uq_card_actions_flag_key")),
    )
    with op.batch_alter_table("card_actions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_card_actions_closure_id"), ["closure_id"], unique=False)
        batch_op.create_index("ix_card_actions_due", ["state", "next_attempt_time"], unique=False)
        batch_op.create_index(batch_op.f("ix_card_actions_lookup_id"), ["lookup_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_card_actions_person_hash"), ["person_hash"], unique=False)

    op.create_table(
        "card_closures",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("person_hash", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("report_id", sa.String(length=40), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_card_closures")),
        sa.UniqueConstraint(
            "person_hash", "request_id", name=op.f("uq_card_closures_person_hash_request_id")
        ),
    )
    with op.batch_alter_table("card_closures", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_card_closures_person_hash"), ["person_hash"], unique=False)

    op.create_table(
        "notifications",
        sa.Column("lookup_id", sa.String(length=40), nullable=False),
        sa.Column("report_id", sa.String(length=40), nullable=False),
        sa.Column("sealed_contact", sa.String(length=512), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("lookup_id", name=op.f("pk_notifications")),
    )
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sealed_contact", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.drop_column("sealed_contact")

    op.drop_table("notifications")
    with op.batch_alter_table("card_closures", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_card_closures_person_hash"))

    op.drop_table("card_closures")
    with op.batch_alter_table("card_actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_card_actions_person_hash"))
        batch_op.drop_index(batch_op.f("ix_card_actions_lookup_id"))
        batch_op.drop_index("ix_card_actions_due")
        batch_op.drop_index(batch_op.f("ix_card_actions_closure_id"))

    op.drop_table("card_actions")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_time"))
        batch_op.drop_index("ix_audit_events_actor_time")

    op.drop_table("audit_events")
