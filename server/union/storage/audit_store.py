"""The audit trail's table: validated identifiers and keyed hashes only (see
server.union.domain.audit), written in the transaction of what it records where there
is one (`insert_audit`)."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import Connection, Table, insert, select
from sqlalchemy.orm import Session

from server.union.domain import model
from server.union.storage.aggregate import Aggregate
from server.union.storage.models import (
    AuditEventRow,
)
from server.union.storage.prepared import Prepared

AUDIT_EVENTS = cast(Table, AuditEventRow.__table__)
INSERT_AUDIT = Prepared(insert(AUDIT_EVENTS))


def insert_audit(c: Connection, entry: model.AuditEntry) -> None:
    INSERT_AUDIT.run(
        c,
        {
            "time": entry.time,
            "actor": entry.actor,
            "action": entry.action,
            "outcome": entry.outcome[:64],
            "resource": entry.resource[:96],
        },
    )


class SqlAudit(Aggregate):
    """server.union.domain.ports.AuditStore; retention: purge_audit_events."""

    async def add_audit_event(
        self, time: datetime, actor: str, action: str, outcome: str, resource: str
    ) -> None:
        def work(s: Session) -> None:
            insert_audit(s.connection(), model.AuditEntry(time, actor, action, outcome, resource))

        # Batched with the other writes of the moment: every lookup and report read is audited.
        await self.runner.run_batched(work)

    async def list_audit_events(
        self,
        actor: str | None,
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, int] | None,
        limit: int,
    ) -> list[model.AuditEvent]:
        def work(s: Session) -> list[model.AuditEvent]:
            query = select(AuditEventRow)
            if actor is not None:
                query = query.where(AuditEventRow.actor == actor)
            if start is not None:
                query = query.where(AuditEventRow.time >= start)
            if end is not None:
                query = query.where(AuditEventRow.time < end)
            if after is not None:
                time, last_id = after
                query = query.where(
                    (AuditEventRow.time < time)
                    | ((AuditEventRow.time == time) & (AuditEventRow.id < last_id))
                )
            rows = s.scalars(query.order_by(AuditEventRow.time.desc(), AuditEventRow.id.desc()).limit(limit))
            return [model.AuditEvent(r.time, r.actor, r.action, r.outcome, r.resource, r.id) for r in rows]

        return await self.runner.run(work)

    async def purge_audit_events(self, before: datetime, limit: int = 5000) -> int:
        return await self.purge_rows(
            AuditEventRow.__table__, AuditEventRow.id, AuditEventRow.time < before, limit
        )
