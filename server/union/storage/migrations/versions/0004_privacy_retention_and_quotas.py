"""atomic quota slots, request fingerprints, and indexes for the retention purges

- `quota_slots`: every rate limit is one conditional upsert on a (key, slot) row, exact under
  concurrent bursts on SQLite and PostgreSQL alike.
- `request_fingerprint` on lookups, closures and card actions: the same request_id with a different
  request is refused (AIP-155); `flag_request` makes a flag's request_id unique per person.
- indexes on the times the retention sweep deletes by; `verified_people` gets a retention too, so
  the number of people served is kept as a counter.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "quota_slots",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", "slot", name=op.f("pk_quota_slots")),
    )
    op.create_index(op.f("ix_quota_slots_time"), "quota_slots", ["time"], unique=False)
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
    with op.batch_alter_table("card_closures", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
    with op.batch_alter_table("card_actions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("flag_request", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_card_actions_flag_request"), ["flag_request"])
        batch_op.create_index(batch_op.f("ix_card_actions_update_time"), ["update_time"], unique=False)
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_verifications_create_time"), ["create_time"], unique=False)
    # verified_people now has a retention; the count of people served lives on in a counter.
    op.execute(
        "INSERT INTO counters (name, value) SELECT 'people_verified', count(*) FROM verified_people"
        " WHERE NOT EXISTS (SELECT 1 FROM counters WHERE name = 'people_verified')"
    )


def downgrade() -> None:
    op.execute("DELETE FROM counters WHERE name = 'people_verified'")
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_verifications_create_time"))
    with op.batch_alter_table("card_actions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_card_actions_update_time"))
        batch_op.drop_constraint(batch_op.f("uq_card_actions_flag_request"), type_="unique")
        batch_op.drop_column("request_fingerprint")
        batch_op.drop_column("flag_request")
    with op.batch_alter_table("card_closures", schema=None) as batch_op:
        batch_op.drop_column("request_fingerprint")
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.drop_column("request_fingerprint")
    op.drop_index(op.f("ix_quota_slots_time"), table_name="quota_slots")
    op.drop_table("quota_slots")
