"""bank_cooldowns: a deleted report keeps the re-query cooldown its lookup started

Deleting a report deletes its lookup, per-bank tasks and counts; the per-bank cooldown read from
them would end with it. The table keeps, per person and bank, only when the bank answered and
until when it may not be asked again, and is purged at that time.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bank_cooldowns",
        sa.Column("person_hash", sa.String(length=64), nullable=False),
        sa.Column("bank_code", sa.String(length=16), nullable=False),
        sa.Column("answer_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("person_hash", "bank_code", name=op.f("pk_bank_cooldowns")),
    )
    op.create_index(op.f("ix_bank_cooldowns_until"), "bank_cooldowns", ["until"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_bank_cooldowns_until"), table_name="bank_cooldowns")
    op.drop_table("bank_cooldowns")
