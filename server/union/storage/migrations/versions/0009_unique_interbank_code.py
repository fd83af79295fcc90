"""a CNAPS (interbank) code names one bank

CreateBank checks that the code is free, but two banks joining at once with the same code could
both pass that check on PostgreSQL; the unique constraint makes the second one fail.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.create_unique_constraint(batch_op.f("uq_banks_interbank_code"), ["interbank_code"])


def downgrade() -> None:
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_banks_interbank_code"), type_="unique")
