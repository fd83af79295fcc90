"""Service counters and statistics: the counters table, and the figures for the admin
surface and /metrics.

Counters are bumped by one atomic UPDATE inside the transaction that did what they
count (a lookup created, a report written, a person verified), by the aggregates that
do it (`bump`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Connection, Table, bindparam, case, func, select, update
from sqlalchemy.orm import Session

from server.union.domain import model
from server.union.storage.aggregate import Aggregate
from server.union.storage.models import (
    BankRow,
    BankTaskRow,
    CounterRow,
    LookupRow,
)
from server.union.storage.prepared import Prepared

COUNTERS_TABLE = cast(Table, CounterRow.__table__)
COUNTERS = ("lookups_created", "reports_generated", "people_verified")

# Every lookup and report updates its counter: built once, run on the driver's connection.
BUMP = Prepared(
    update(COUNTERS_TABLE)
    .where(COUNTERS_TABLE.c.name == bindparam("k_name"))
    .values(value=COUNTERS_TABLE.c.value + bindparam("v_by"))
)


def bump(s: Session | Connection, name: str, by: int = 1) -> None:
    """One atomic UPDATE: concurrent transactions never race on a read-modify-write.
    The rows exist from seed_catalogue on."""
    c = s.connection() if isinstance(s, Session) else s
    BUMP.run(c, {"k_name": name, "v_by": by})


@dataclass(frozen=True)
class MonitoringTotals:
    people_verified: int
    lookups_created: int
    reports_generated: int
    # Lookups still running past their deadline: the orchestrator should have finalised them.
    lookups_overdue: int
    # Per bank: calls due now that no replica has claimed (the backlog of the fan-out).
    bank_tasks_waiting: dict[str, int]
    # Per bank: lookups finalised at their deadline without its answer, within the miss window.
    bank_deadline_misses: dict[str, int]


class SqlStats(Aggregate):
    """server.union.domain.ports.StatsStore, and the database-wide figures for /metrics."""

    async def stats(self) -> model.ServiceStats:
        def work(s: Session) -> model.ServiceStats:
            counters = {row.name: row.value for row in s.scalars(select(CounterRow))}
            per_bank = s.execute(
                select(
                    BankTaskRow.bank_code,
                    func.sum(case((BankTaskRow.outcome == model.BankOutcome.ANSWERED, 1), else_=0)),
                    func.sum(
                        case(
                            (
                                BankTaskRow.outcome.in_(
                                    [model.BankOutcome.FAILED, model.BankOutcome.NO_RESPONSE]
                                ),
                                1,
                            ),
                            else_=0,
                        )
                    ),
                    func.avg(BankTaskRow.latency_ms),
                ).group_by(BankTaskRow.bank_code)
            )
            positions = {row.code: row.position for row in s.scalars(select(BankRow))}
            banks = sorted(
                (
                    model.BankStats(code, int(ok or 0), int(bad or 0), float(latency or 0.0))
                    for code, ok, bad, latency in per_bank
                ),
                key=lambda b: positions.get(b.bank_code, 999),
            )
            return model.ServiceStats(
                people_verified=counters.get("people_verified", 0),
                lookups_created=counters.get("lookups_created", 0),
                reports_generated=counters.get("reports_generated", 0),
                banks=banks,
            )

        return await self.runner.run(work)

    async def monitoring_totals(
        self, now: datetime, miss_window: timedelta = timedelta(hours=1)
    ) -> MonitoringTotals:
        """Database-wide figures for /metrics, the same whichever replica reads them. Each is one
        indexed read (the due-task index, the state-and-deadline index) or a small table's count."""

        def work(s: Session) -> MonitoringTotals:
            counters = {row.name: row.value for row in s.scalars(select(CounterRow))}
            running = LookupRow.state == model.LookupState.RUNNING
            waiting = s.execute(
                select(BankTaskRow.bank_code, func.count())
                .where(
                    BankTaskRow.outcome == model.BankOutcome.PENDING,
                    BankTaskRow.next_attempt_time <= now,
                    BankTaskRow.lease_until.is_(None) | (BankTaskRow.lease_until <= now),
                )
                .group_by(BankTaskRow.bank_code)
            )
            missed = s.execute(
                select(BankTaskRow.bank_code, func.count())
                .where(
                    BankTaskRow.outcome == model.BankOutcome.NO_RESPONSE,
                    BankTaskRow.update_time > now - miss_window,
                )
                .group_by(BankTaskRow.bank_code)
            )
            return MonitoringTotals(
                people_verified=counters.get("people_verified", 0),  # outlives the purged pseudonyms
                lookups_created=counters.get("lookups_created", 0),
                reports_generated=counters.get("reports_generated", 0),
                lookups_overdue=s.scalar(select(func.count()).where(running, LookupRow.deadline_time <= now))
                or 0,
                bank_tasks_waiting={code: int(count) for code, count in waiting},
                bank_deadline_misses={code: int(count) for code, count in missed},
            )

        return await self.runner.run(work)
