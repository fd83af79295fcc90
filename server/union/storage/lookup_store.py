"""Lookups and their per-bank tasks: creating a lookup, reading its progress, and the
work queue of bank calls (claims with leases, deadlines, what falls due next).

The hot path (create, the watch's re-read) is SQLAlchemy Core with its statements
built once and run on the driver's connection (prepared.Prepared) rather than the
ORM's unit of work per row: it runs hundreds of times a second. Recording answers
and writing the report is answer_store.

Retention: a lookup and its tasks go with its report (report_store's purge).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Connection, Table, bindparam, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.union.domain import model
from server.union.domain.ports import DuplicateRequest
from server.union.storage.aggregate import Aggregate, same_request, utc
from server.union.storage.audit_store import insert_audit
from server.union.storage.card_action_store import earliest_action_due, earliest_due, release_action_leases
from server.union.storage.models import (
    BankCooldownRow,
    BankTaskRow,
    IdentityRow,
    LookupRow,
    ReportRow,
)
from server.union.storage.prepared import Prepared
from server.union.storage.stats_store import bump

LOOKUPS = cast(Table, LookupRow.__table__)
TASKS = cast(Table, BankTaskRow.__table__)
REPORTS = cast(Table, ReportRow.__table__)
IDENTITIES = cast(Table, IdentityRow.__table__)
COOLDOWNS = cast(Table, BankCooldownRow.__table__)

# Everything CreateLookup checks, in one statement: the lookup this request_id made (if any),
# whether one is running, when the latest completed.
PERSON_ACTIVITY = Prepared(
    select(
        func.max(case((LOOKUPS.c.request_id == bindparam("request_id"), LOOKUPS.c.id))).label("existing_id"),
        func.count(case((LOOKUPS.c.state == model.LookupState.RUNNING, 1))).label("running"),
        func.max(
            case((LOOKUPS.c.request_id == bindparam("request_id"), LOOKUPS.c.request_fingerprint))
        ).label("existing_fingerprint"),
    ).where(LOOKUPS.c.person_hash == bindparam("person_hash"))
)
# A lookup with its banks' progress in one statement (one row per bank).
LOOKUP_WITH_PROGRESS = Prepared(
    select(
        LOOKUPS.c.person_hash,
        LOOKUPS.c.state,
        LOOKUPS.c.create_time,
        LOOKUPS.c.deadline_time,
        LOOKUPS.c.report_id,
        LOOKUPS.c.unasked_banks,
        TASKS.c.bank_code,
        TASKS.c.bank_name,
        TASKS.c.outcome,
        TASKS.c.attempt_count,
        TASKS.c.card_count,
        TASKS.c.debit_count,
        TASKS.c.credit_count,
        TASKS.c.failure_reason,
        REPORTS.c.expire_time.label("report_expire_time"),
    )
    .select_from(
        LOOKUPS.outerjoin(TASKS, TASKS.c.lookup_id == LOOKUPS.c.id).outerjoin(
            REPORTS, REPORTS.c.id == LOOKUPS.c.report_id
        )
    )
    .where(LOOKUPS.c.id == bindparam("lookup_id"))
    .order_by(TASKS.c.position)
)
# PostgreSQL: a person's CreateLookups take turns (the row lock is held to commit), so the
# in-progress check and the cooldown are one decision. SQLite's single writer does the same.
LOCK_PERSON = Prepared(
    select(IDENTITIES.c.person_hash)
    .where(IDENTITIES.c.person_hash == bindparam("person_hash"))
    .with_for_update()
)
INSERT_LOOKUP = Prepared(insert(LOOKUPS))
INSERT_TASKS = Prepared(insert(TASKS))


class SqlLookups(Aggregate):
    """server.union.domain.ports.LookupStore, but for answers (answer_store.SqlAnswers)."""

    async def find_lookup_by_request(
        self, person_hash: str, request_id: str, request_fingerprint: str
    ) -> model.Lookup | None:
        """The lookup this person's `request_id` (a keyed hash) made, if any (AIP-155 retries);
        RequestMismatch if it was made by a different request."""

        def work(c: Connection) -> model.Lookup | None:
            existing, _, fingerprint = person_activity(c, person_hash, request_id)
            same_request(existing, fingerprint, request_fingerprint)
            return existing

        return await self.runner.core_read(work)

    async def create_lookup(
        self,
        lookup_id: str,
        person_hash: str,
        request_id: str,
        request_fingerprint: str,
        region_code: str,
        sealed_identity: str,
        sealed_contact: str | None,
        banks: Sequence[model.Bank],
        now: datetime,
        deadline: datetime,
        claim: model.ClaimRequest | None = None,
        audit: model.AuditEntry | Sequence[model.AuditEntry] | None = None,
        admit: Callable[[model.PersonActivity], model.Admission | None] | None = None,
    ) -> tuple[model.Lookup, list[model.Claim], bool]:
        """Persist the lookup and one pending task per bank in one transaction; returns the
        lookup, its claims, and whether it was created.

        If this person's `request_id` already made a lookup, that one is returned and nothing is
        written (AIP-155). Otherwise `admit` is given the person's activity, read in the same
        transaction, and may refuse by raising (nothing is written then either): one round trip
        to the writer instead of a read and then a write. It may also narrow `banks` (returning an
        Admission: the banks to ask, and the banks not asked, which are kept with the lookup).

        With `claim`, the tasks of `claim.bank_codes` are leased to `claim.owner` in the same
        transaction and returned as claims: the creating replica starts those calls at once,
        without a round trip through the work queue (any replica still resumes them if it dies)."""
        claimed = set(claim.bank_codes) if claim is not None else set()

        def work(c: Connection) -> tuple[model.Lookup, list[model.Claim], bool]:
            self.runner.lock(c, LOCK_PERSON, {"person_hash": person_hash})
            existing, activity, fingerprint = person_activity(c, person_hash, request_id)
            if existing is not None:
                same_request(existing, fingerprint, request_fingerprint)
                return existing, [], False
            unasked: list[model.UnaskedBank] = []
            asked = list(banks)
            if admit is not None:
                activity = replace(activity, answered_banks=answered_banks(c, person_hash))
                admission = admit(activity)
                if admission is not None:
                    asked, unasked = list(admission.banks), list(admission.unasked)
            INSERT_LOOKUP.run(
                c,
                {
                    "id": lookup_id,
                    "person_hash": person_hash,
                    "request_id": request_id,
                    "request_fingerprint": request_fingerprint,
                    "region_code": region_code,
                    "state": model.LookupState.RUNNING,
                    "create_time": now,
                    "deadline_time": deadline,
                    "complete_time": None,
                    "sealed_identity": sealed_identity,
                    "report_id": None,
                    "sealed_contact": sealed_contact,
                    "unasked_banks": unasked_to_json(unasked),
                },
            )
            rows = []
            for bank in asked:
                mine = claim is not None and bank.code in claimed
                rows.append(
                    {
                        "lookup_id": lookup_id,
                        "bank_code": bank.code,
                        "position": bank.position,
                        "bank_name": bank.name,
                        "outcome": model.BankOutcome.PENDING,
                        "attempt_count": 1 if mine else 0,
                        "next_attempt_time": now,
                        "lease_owner": claim.owner if mine and claim is not None else None,
                        "lease_until": now + claim.lease if mine and claim is not None else None,
                        "card_count": 0,
                        "debit_count": 0,
                        "credit_count": 0,
                        "failure_reason": "",
                        "latency_ms": None,
                        "update_time": now,
                    }
                )
            INSERT_TASKS.run_many(c, rows)
            bump(c, "lookups_created")
            for entry in [audit] if isinstance(audit, model.AuditEntry) else audit or ():
                insert_audit(c, entry)
            lookup = model.Lookup(
                id=lookup_id,
                state=model.LookupState.RUNNING,
                create_time=now,
                deadline_time=deadline,
                report_id=None,
                banks=[
                    model.BankProgress(
                        bank_code=bank.code,
                        bank_name=bank.name,
                        outcome=model.BankOutcome.PENDING,
                        attempt_count=1 if bank.code in claimed else 0,
                        card_count=0,
                        debit_count=0,
                        credit_count=0,
                        failure_reason="",
                    )
                    for bank in sorted(asked, key=lambda b: b.position)
                ],
                unasked=unasked,
            )
            claims = [
                model.Claim(lookup_id, bank.code, 1, sealed_identity, deadline)
                for bank in asked
                if bank.code in claimed
            ]
            return lookup, claims, True

        try:
            return await self.runner.core_batched(work)
        except IntegrityError as error:
            raise DuplicateRequest(request_id) from error

    async def get_lookup(self, lookup_id: str, person_hash: str | None) -> model.Lookup | None:
        """The lookup if it exists and (when person_hash is given) belongs to that person."""

        def work(c: Connection) -> model.Lookup | None:
            found = read_lookup(c, lookup_id)
            if found is None or (person_hash is not None and found[0] != person_hash):
                return None
            return found[1]

        return await self.runner.core_read(work)

    async def list_lookups(
        self, person_hash: str, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[model.Lookup]:
        """This person's lookups, newest first, keyset-paginated after (create_time, id): the
        running ones and the completed ones whose report is unexpired (a lookup whose report
        expired, was deleted or purged is gone for its owner, as the report is)."""

        def work(s: Session) -> list[model.Lookup]:
            live_report = (
                select(REPORTS.c.id)
                .where(REPORTS.c.id == LOOKUPS.c.report_id, REPORTS.c.expire_time > now)
                .exists()
            )
            query = select(LOOKUPS.c.id).where(
                LOOKUPS.c.person_hash == person_hash,
                (LOOKUPS.c.state == model.LookupState.RUNNING) | live_report,
            )
            if after is not None:
                time, last_id = after
                query = query.where(
                    (LOOKUPS.c.create_time < time)
                    | ((LOOKUPS.c.create_time == time) & (LOOKUPS.c.id < last_id))
                )
            ids = s.scalars(query.order_by(LOOKUPS.c.create_time.desc(), LOOKUPS.c.id.desc()).limit(limit))
            found = [read_lookup(s.connection(), lookup_id) for lookup_id in list(ids)]
            return [lookup for _, lookup in filter(None, found)]

        # Not a hot-path read (a person asking for their list), so an ordinary transaction.
        return await self.runner.run(work)

    async def claim_due_tasks(
        self, owner: str, now: datetime, lease: timedelta, limit: int, skip_banks: Iterable[str] = ()
    ) -> list[model.Claim]:
        """Lease up to `limit` due bank tasks to `owner` (SKIP LOCKED on PostgreSQL), none of
        `skip_banks` (banks this replica has no room for right now)."""
        skipped = list(skip_banks)

        def work(s: Session) -> list[model.Claim]:
            query = (
                select(BankTaskRow, LookupRow.sealed_identity, LookupRow.deadline_time)
                .join(LookupRow, LookupRow.id == BankTaskRow.lookup_id)
                .where(
                    BankTaskRow.outcome == model.BankOutcome.PENDING,
                    BankTaskRow.next_attempt_time <= now,
                    (BankTaskRow.lease_until.is_(None)) | (BankTaskRow.lease_until < now),
                    LookupRow.deadline_time > now,
                )
                .order_by(BankTaskRow.next_attempt_time)
                .limit(limit)
            )
            if skipped:
                query = query.where(BankTaskRow.bank_code.not_in(skipped))
            query = self.runner.skip_locked(query, of=BankTaskRow)
            claims = []
            for task, sealed, deadline in s.execute(query):
                task.lease_owner = owner
                task.lease_until = now + lease
                task.attempt_count += 1
                claims.append(
                    model.Claim(task.lookup_id, task.bank_code, task.attempt_count, sealed, deadline)
                )
            return claims

        return await self.runner.run(work)

    async def release_leases(self, owner: str) -> int:
        """Hand back this replica's unfinished claims (graceful shutdown) so others resume them now."""

        def work(s: Session) -> int:
            tasks = s.execute(
                update(BankTaskRow)
                .where(BankTaskRow.lease_owner == owner, BankTaskRow.outcome == model.BankOutcome.PENDING)
                .values(lease_owner=None, lease_until=None)
            )
            return int(tasks.rowcount) + release_action_leases(s, owner)  # type: ignore[attr-defined]

        return await self.runner.run(work)

    async def lookups_past_deadline(self, now: datetime, limit: int) -> list[str]:
        def work(s: Session) -> list[str]:
            return list(
                s.scalars(
                    select(LookupRow.id)
                    .where(LookupRow.state == model.LookupState.RUNNING, LookupRow.deadline_time <= now)
                    .limit(limit)
                )
            )

        return await self.runner.run(work)

    async def running_lookups_without_pending_tasks(self, limit: int) -> list[str]:
        """Lookups whose banks are all final but whose report was never written (a crash between)."""

        def work(s: Session) -> list[str]:
            pending = (
                select(BankTaskRow.lookup_id)
                .where(BankTaskRow.outcome == model.BankOutcome.PENDING)
                .scalar_subquery()
            )
            return list(
                s.scalars(
                    select(LookupRow.id)
                    .where(LookupRow.state == model.LookupState.RUNNING, LookupRow.id.not_in(pending))
                    .limit(limit)
                )
            )

        return await self.runner.run(work)

    async def next_due_time(self) -> datetime | None:
        """When the earliest pending task, card action or deadline falls due (the scheduler's sleep)."""

        def work(s: Session) -> datetime | None:
            task = s.scalar(
                select(earliest_due(BankTaskRow)).where(BankTaskRow.outcome == model.BankOutcome.PENDING)
            )
            deadline = s.scalar(
                select(func.min(LookupRow.deadline_time)).where(LookupRow.state == model.LookupState.RUNNING)
            )
            action = earliest_action_due(s)
            candidates = [t for t in (utc(task), utc(deadline), action) if t is not None]
            return min(candidates) if candidates else None

        return await self.runner.run(work)


def person_activity(
    c: Connection, person_hash: str, request_id: str
) -> tuple[model.Lookup | None, model.PersonActivity, str | None]:
    """In one statement: the lookup this person's `request_id` made (if any) with the fingerprint
    of the request that made it, and what admitting a new one depends on."""
    [(existing_id, running, fingerprint)] = PERSON_ACTIVITY.run(
        c, {"person_hash": person_hash, "request_id": request_id}
    )
    found = read_lookup(c, existing_id) if existing_id is not None else None
    return (found[1] if found else None), model.PersonActivity(bool(running)), fingerprint


def read_lookup(c: Connection, lookup_id: str) -> tuple[str, model.Lookup] | None:
    """(owner's person_hash, the lookup with its banks' progress), or None if there is none."""
    rows = LOOKUP_WITH_PROGRESS.run(c, {"lookup_id": lookup_id})
    if not rows:
        return None
    first = rows[0]
    lookup = model.Lookup(
        id=lookup_id,
        state=model.LookupState(first.state),
        create_time=first.create_time,
        deadline_time=first.deadline_time,
        report_id=first.report_id,
        banks=[
            model.BankProgress(
                bank_code=row.bank_code,
                bank_name=row.bank_name,
                outcome=model.BankOutcome(row.outcome),
                attempt_count=row.attempt_count,
                card_count=row.card_count,
                debit_count=row.debit_count,
                credit_count=row.credit_count,
                failure_reason=row.failure_reason,
            )
            for row in rows
            if row.bank_code is not None
        ],
        report_expire_time=utc(first.report_expire_time),
        unasked=unasked_from_json(first.unasked_banks),
    )
    return first.person_hash, lookup


# Per bank: when the latest of the person's completed lookups that the bank answered completed.
ANSWERED_BANKS = Prepared(
    select(TASKS.c.bank_code, func.max(LOOKUPS.c.complete_time).label("last_answered"))
    .select_from(LOOKUPS.join(TASKS, TASKS.c.lookup_id == LOOKUPS.c.id))
    .where(
        LOOKUPS.c.person_hash == bindparam("person_hash"),
        LOOKUPS.c.state == model.LookupState.COMPLETED,
        TASKS.c.outcome == model.BankOutcome.ANSWERED,
    )
    .group_by(TASKS.c.bank_code)
)


# The same for lookups whose report the person deleted (report_store keeps their cooldown).
COOLDOWNS_KEPT = Prepared(
    select(COOLDOWNS.c.bank_code, COOLDOWNS.c.answer_time).where(
        COOLDOWNS.c.person_hash == bindparam("person_hash")
    )
)


def answered_banks(c: Connection, person_hash: str) -> dict[str, datetime]:
    """What the per-bank re-query cooldown depends on, read in the creating transaction (after
    the person's row lock on PostgreSQL), so the decision is exact under concurrent requests."""
    answered: dict[str, datetime] = {}
    for statement in (ANSWERED_BANKS, COOLDOWNS_KEPT):
        for code, last in statement.run(c, {"person_hash": person_hash}):
            when = utc(last)
            if when is not None and (code not in answered or when > answered[code]):
                answered[code] = when
    return answered


def unasked_to_json(unasked: Sequence[model.UnaskedBank]) -> str | None:
    """The banks a lookup did not ask and why: bank codes and names only, kept with the lookup."""
    if not unasked:
        return None
    return json.dumps(
        [
            [
                bank.bank_code,
                bank.bank_name,
                bank.reason.value,
                bank.next_query_time.isoformat() if bank.next_query_time else None,
            ]
            for bank in unasked
        ],
        ensure_ascii=False,
    )


def unasked_from_json(text: str | None) -> list[model.UnaskedBank]:
    if not text:
        return []
    return [
        model.UnaskedBank(
            code, name, model.UnaskedReason(reason), datetime.fromisoformat(when) if when else None
        )
        for code, name, reason, when in json.loads(text)
    ]
