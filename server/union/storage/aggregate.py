"""What every aggregate's storage module shares: its runner, and a few row rules.

An aggregate module (catalogue_store, lookup_store, ...) is a class of coroutines
over one `Runner`; `Store` (database.py) is all of them on one database. The rules
here are the ones several aggregates keep alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from server.union.domain.ports import RequestMismatch
from server.union.storage.runner import Runner


class Aggregate:
    """Storage of one aggregate, on the database `runner` runs."""

    runner: Runner

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def purge_rows(self, table: Any, key: Any, expired: Any, limit: int) -> int:
        """Delete at most `limit` rows of `table` that match `expired` (retention purges: a sweep
        never holds the writer long)."""

        def work(s: Session) -> int:
            doomed = select(key).where(expired).limit(limit).scalar_subquery()
            result = s.execute(delete(table).where(key.in_(doomed)))
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self.runner.run(work)


def utc(value: datetime | None) -> datetime | None:
    """Core reads through the typed columns already give aware UTC; this guards aggregates
    (max() loses the column type on some backends)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def same_request(existing: object | None, stored: str | None, asked: str) -> None:
    """AIP-155: a request_id names one request. Rows from before fingerprints were kept have none."""
    if existing is not None and stored is not None and stored != asked:
        raise RequestMismatch()
