"""regions' pilot batch, banks' CNAPS code and TLS name, the banks a lookup does not ask

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here, not imported: a migration must mean the same thing whatever the code becomes.
_BATCH_1 = ("310000", "530000")
_BATCH_2 = (
    "110000",
    "500000",
    "520000",
    "220000",
    "650000",
    "610000",
    "350000",
    "430000",
    "140000",
    "330000",
    "410000",
    "340000",
    "230000",
    "460000",
)
_INTERBANK_CODES = {
    "ICBC": "102",
    "ABC": "103",
    "BOC": "104",
    "CCB": "105",
    "BOCOM": "301",
    "PSBC": "403",
    "CITIC": "302",
    "CEB": "303",
    "CMB": "308",
    "SPDB": "310",
    "CMBC": "305",
    "HXB": "304",
    "PAB": "307",
    "CIB": "309",
    "CGB": "306",
    "CZB": "316",
}


def upgrade() -> None:
    with op.batch_alter_table("regions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pilot_batch", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("pilot_open_date", sa.Date(), nullable=True))
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("interbank_code", sa.String(length=3), nullable=True))
        batch_op.add_column(sa.Column("tls_name", sa.String(length=253), nullable=True))
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unasked_banks", sa.Text(), nullable=True))

    # Databases seeded before this revision learn the pilot's facts here (new ones are seeded with them).
    regions = sa.table(
        "regions", sa.column("code", sa.String), sa.column("pilot_batch"), sa.column("pilot_open_date")
    )
    for batch, opened, codes in ((1, dt.date(2021, 12, 1), _BATCH_1), (2, dt.date(2022, 3, 1), _BATCH_2)):
        op.execute(
            regions.update()
            .where(regions.c.code.in_(codes))
            .values(pilot_batch=batch, pilot_open_date=opened)
        )
    banks = sa.table("banks", sa.column("code", sa.String), sa.column("interbank_code", sa.String))
    for code, interbank_code in _INTERBANK_CODES.items():
        op.execute(banks.update().where(banks.c.code == code).values(interbank_code=interbank_code))


def downgrade() -> None:
    with op.batch_alter_table("lookups", schema=None) as batch_op:
        batch_op.drop_column("unasked_banks")
    with op.batch_alter_table("banks", schema=None) as batch_op:
        batch_op.drop_column("tls_name")
        batch_op.drop_column("interbank_code")
    with op.batch_alter_table("regions", schema=None) as batch_op:
        batch_op.drop_column("pilot_open_date")
        batch_op.drop_column("pilot_batch")
