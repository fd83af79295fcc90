"""drop the person_hash indexes that duplicate a unique index's first column

`lookups` and `card_closures` each have a unique (person_hash, request_id) index, which serves every
query by person_hash alone as well; the single-column index beside it only cost every insert a
second B-tree write.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lookups_person_hash"))
    with op.batch_alter_table("card_closures", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_card_closures_person_hash"))


def downgrade() -> None:
    with op.batch_alter_table("card_closures", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_card_closures_person_hash"), ["person_hash"], unique=False)
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lookups_person_hash"), ["person_hash"], unique=False)
