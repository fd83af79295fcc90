"""Quota slots: every rate limit as one atomic decision on every backend (a conditional
upsert per slot), and their purge once their window has passed."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from server.union.storage.aggregate import Aggregate, utc
from server.union.storage.models import (
    QuotaSlotRow,
)


class SqlQuotas(Aggregate):
    """server.union.domain.ports.QuotaStore; retention: purge_quota_slots."""

    async def take_quota_slot(
        self, key: str, limit: int, window: timedelta, now: datetime
    ) -> timedelta | None:
        """Take one of `key`'s `limit` slots for `window`: None if taken, else how long until one
        frees. One decision, exact under concurrency: each slot is claimed by a conditional upsert
        (insert it, or take it over if its time fell out of the window), and a slot that another
        transaction holds is waited for (PostgreSQL row lock; SQLite has one writer), then seen
        taken."""
        cutoff = now - window

        def work(s: Session) -> timedelta | None:
            for slot in range(limit):
                statement = (
                    self.runner.upsert(QuotaSlotRow)
                    .values(key=key, slot=slot, time=now)
                    .on_conflict_do_update(
                        index_elements=[QuotaSlotRow.key, QuotaSlotRow.slot],
                        set_={"time": now},
                        where=QuotaSlotRow.time <= cutoff,
                    )
                    .returning(QuotaSlotRow.slot)
                )
                if s.execute(statement).scalar() is not None:  # a row comes back only if it was taken
                    return None
            oldest = s.scalar(select(func.min(QuotaSlotRow.time)).where(QuotaSlotRow.key == key))
            oldest = utc(oldest)
            return max(oldest + window - now, timedelta(seconds=1)) if oldest is not None else window

        return await self.runner.run(work)

    async def purge_quota_slots(self, before: datetime) -> int:
        """Quota slots taken before `before` (a window's length ago: they limit nothing any more)."""

        def work(s: Session) -> int:
            result = s.execute(delete(QuotaSlotRow).where(QuotaSlotRow.time < before))
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self.runner.run(work)
