"""when each found card was opened, as its bank said

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: cards found before this revision keep no opening time (they expire with their
    # reports within days); retention is the report's.
    with op.batch_alter_table("found_cards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("open_time", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("found_cards", schema=None) as batch_op:
        batch_op.drop_column("open_time")
