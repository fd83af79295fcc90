"""The report-ready outbox: one row per report whose SMS has not gone out, written in the
transaction that writes the report, deleted once sent, purged if it never could be."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, delete, insert, select
from sqlalchemy.orm import Session

from server.union.storage.aggregate import Aggregate
from server.union.storage.models import (
    NotificationRow,
)
from server.union.storage.prepared import Prepared

NOTIFICATIONS = cast(Table, NotificationRow.__table__)
INSERT_NOTIFICATIONS = Prepared(insert(NOTIFICATIONS))


class SqlNotifications(Aggregate):
    """server.union.domain.ports.NotificationStore; retention: purge_notifications."""

    async def pending_notifications(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """(lookup_id, report_id, sealed_contact) of reports not yet announced."""

        def work(s: Session) -> list[tuple[str, str, str]]:
            rows = s.scalars(select(NotificationRow).order_by(NotificationRow.create_time).limit(limit))
            return [(r.lookup_id, r.report_id, r.sealed_contact) for r in rows]

        return await self.runner.run(work)

    async def delete_notifications(self, lookup_ids: Sequence[str]) -> int:
        """Drop the outbox rows of these lookups (their messages went out)."""
        if not lookup_ids:
            return 0

        def work(s: Session) -> int:
            result = s.execute(delete(NotificationRow).where(NotificationRow.lookup_id.in_(lookup_ids)))
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self.runner.run_batched(work)

    async def purge_notifications(self, before: datetime, limit: int = 5000) -> int:
        """Report-ready messages that could not be sent since before `before`."""
        return await self.purge_rows(
            NotificationRow.__table__, NotificationRow.lookup_id, NotificationRow.create_time < before, limit
        )
