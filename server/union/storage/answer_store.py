"""Recording what banks answered, and the report at the end of a lookup.

Answers that arrive together are recorded by one set of statements (one SELECT of
the leases, one UPDATE and one INSERT executed for many rows), in one transaction,
rather than a set per answer: a lookup's banks answer within milliseconds of each
other. Only the lease holder
of a task may record it; the transaction that records a lookup's last answer (or
gives up its last bank, or reaches its deadline) writes its one report, erases the
sealed identity and queues the report-ready message."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, case, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from server.union.domain import model
from server.union.domain.ports import PlanFactory
from server.union.storage.aggregate import Aggregate
from server.union.storage.lookup_store import LOOKUPS, TASKS
from server.union.storage.outbox_store import INSERT_NOTIFICATIONS
from server.union.storage.prepared import KeyedUpdate, Prepared
from server.union.storage.report_store import INSERT_CARDS, INSERT_REPORTS, found_card_rows
from server.union.storage.runner import Runner, savepoint, settle
from server.union.storage.stats_store import bump

log = logging.getLogger(__name__)

# How long the first of a burst of bank answers waits for the others before they are written.
ANSWER_GATHER_SECONDS = 0.002

PENDING_OF_LOOKUPS = Prepared(
    select(TASKS.c.lookup_id, TASKS.c.bank_code, TASKS.c.lease_owner, TASKS.c.position).where(
        TASKS.c.lookup_id.in_(bindparam("lookup_ids", expanding=True)),
        TASKS.c.outcome == model.BankOutcome.PENDING,
    )
)
LOCK_LOOKUPS = Prepared(
    select(LOOKUPS.c.id)
    .where(LOOKUPS.c.id.in_(bindparam("lookup_ids", expanding=True)))
    .order_by(LOOKUPS.c.id)
    .with_for_update()
)
RECORD_ANSWER = Prepared(
    KeyedUpdate(
        TASKS,
        keys=("lookup_id", "bank_code"),
        values=("card_count", "debit_count", "credit_count", "latency_ms", "update_time"),
        fixed={
            "outcome": model.BankOutcome.ANSWERED,
            "failure_reason": "",
            "lease_owner": None,
            "lease_until": None,
        },
    )
)
RUNNING_OF_LOOKUPS = Prepared(
    select(LOOKUPS.c.id, LOOKUPS.c.person_hash, LOOKUPS.c.sealed_contact).where(
        LOOKUPS.c.id.in_(bindparam("lookup_ids", expanding=True)),
        LOOKUPS.c.state == model.LookupState.RUNNING,
    )
)
# Erases the sealed identity and contact: the lookup is final.
COMPLETE_LOOKUP = Prepared(
    KeyedUpdate(
        LOOKUPS,
        keys=("id",),
        values=("complete_time", "report_id"),
        fixed={"state": model.LookupState.COMPLETED, "sealed_identity": None, "sealed_contact": None},
    )
)
# PostgreSQL: a lookup's writers take turns (see _take_leased_task and _finalize).
LOCK_LOOKUP = Prepared(select(LOOKUPS.c.id).where(LOOKUPS.c.id == bindparam("lookup_id")).with_for_update())


class SqlAnswers(Aggregate):
    """The answer side of server.union.domain.ports.LookupStore."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(runner)
        self._answers: list[tuple[_Answer, asyncio.Future[tuple[bool, bool]]]] = []
        self._answers_lock = threading.Lock()
        self._answers_scheduled = False
        self._answer_flushes: set[asyncio.Task[None]] = set()

    async def record_answer(
        self,
        lookup_id: str,
        bank_code: str,
        owner: str,
        cards: Sequence[tuple[str, model.MaskedCard]],
        latency_ms: int,
        now: datetime,
        plan: PlanFactory,
    ) -> tuple[bool, bool]:
        """Store a bank's complete answer, once: only the current lease holder may write it.
        If it was the last bank, the report (as `plan()`) is written in the same transaction.

        `cards` pairs the bank's own opaque reference with the card as the report shows it.
        Returns (recorded, report written)."""
        answer = _Answer(lookup_id, bank_code, owner, cards, latency_ms, now, plan)
        return await self._record_answers_together(answer)

    async def record_attempt_failed(
        self,
        lookup_id: str,
        bank_code: str,
        owner: str,
        reason: str,
        retry_at: datetime | None,
        now: datetime,
        plan: PlanFactory,
    ) -> tuple[bool, bool]:
        """A failed attempt: schedule a retry at `retry_at`, or give the bank up as failed (and, if
        it was the last bank, write the report as `plan()`). Returns (recorded, report written)."""

        def work(s: Session) -> tuple[bool, bool]:
            c = s.connection()
            values: dict[str, Any] = {
                "failure_reason": reason[:255],
                "lease_owner": None,
                "lease_until": None,
                "update_time": now,
            }
            if retry_at is not None:
                values["next_attempt_time"] = retry_at
            else:
                values["outcome"] = model.BankOutcome.FAILED
            if _take_leased_task(c, self.runner, lookup_id, bank_code, owner, **values) is None:
                return False, False
            if retry_at is not None:
                return True, False
            return True, _pending_tasks(c, lookup_id) == 0 and _finalize(
                s, self.runner, lookup_id, plan, now, False
            )

        return await self.runner.run_batched(work)

    async def finalize_lookup(self, lookup_id: str, plan: PlanFactory, now: datetime, force: bool) -> bool:
        """Produce the lookup's one report once every bank is final (or, with force, mark the
        silent banks NO_RESPONSE first). Erases the sealed identity. False if not (yet) done."""

        def work(s: Session) -> bool:
            return _finalize(s, self.runner, lookup_id, plan, now, force)

        return await self.runner.run(work)

    async def _record_answers_together(self, answer: _Answer) -> tuple[bool, bool]:
        """Every bank answer waiting while the previous ones are written is recorded with them,
        by one set of statements (one SELECT of the leases, one UPDATE and one INSERT executed
        for many rows) instead of a set per answer."""
        future: asyncio.Future[tuple[bool, bool]] = asyncio.get_running_loop().create_future()
        with self._answers_lock:
            self._answers.append((answer, future))
            schedule = not self._answers_scheduled
            self._answers_scheduled = True
        if schedule:
            task = asyncio.create_task(self._flush_answers(), name="record-answers")
            self._answer_flushes.add(task)
            task.add_done_callback(self._answer_flushes.discard)
        return await future

    def _take_answers(self) -> list[tuple[_Answer, asyncio.Future[tuple[bool, bool]]]]:
        with self._answers_lock:
            taken, self._answers = self._answers, []
            self._answers_scheduled = False
        return taken

    async def _flush_answers(self) -> None:
        taken: list[tuple[_Answer, asyncio.Future[tuple[bool, bool]]]] = []

        def work(c: Connection) -> list[tuple[bool, bool]]:
            # Taken in the writer thread as the write starts: whatever arrived while the writer
            # was busy joins this batch.
            taken.extend(self._take_answers())
            return _record_answers(c, self.runner, [answer for answer, _ in taken])

        try:
            # The other banks of a lookup answer within a few milliseconds of the first: waiting
            # that long lets one transaction record them, where an idle writer would otherwise
            # commit each answer on its own.
            await asyncio.sleep(ANSWER_GATHER_SECONDS)
            # No savepoint of its own: _record_answers sets its own, one answer apart if need be.
            results = await self.runner.core_batched(work, savepoint=False)
        except BaseException as error:
            for _, future in taken or self._take_answers():
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()  # shutting down: the answer's lease lapses and it is asked again
                else:
                    settle(future, None, error)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        for (_, future), result in zip(taken, results, strict=True):
            settle(future, result, None)


@dataclass(frozen=True)
class _Answer:
    """A bank's complete answer, waiting to be recorded (see SqlAnswers.record_answer)."""

    lookup_id: str
    bank_code: str
    owner: str
    cards: Sequence[tuple[str, model.MaskedCard]]
    latency_ms: int
    now: datetime
    plan: PlanFactory


def _pending_tasks(c: Connection, lookup_id: str) -> int:
    """A cheap count, so that only the last bank's answer pays for finishing the lookup."""
    return (
        c.execute(
            select(func.count())
            .select_from(TASKS)
            .where(TASKS.c.lookup_id == lookup_id, TASKS.c.outcome == model.BankOutcome.PENDING)
        ).scalar()
        or 0
    )


def _record_answers(c: Connection, runner: Runner, answers: list[_Answer]) -> list[tuple[bool, bool]]:
    """(recorded, report written) for each answer. All in one savepoint; should that fail, each
    answer in its own, so that one bad answer cannot lose the others."""
    try:
        with savepoint(c):
            return _record_answers_at_once(c, runner, answers)
    except OperationalError:
        raise
    except Exception:
        if len(answers) == 1:
            raise
    results: list[tuple[bool, bool]] = []
    for answer in answers:
        try:
            with savepoint(c):
                results.append(_record_answers_at_once(c, runner, [answer])[0])
        except OperationalError:
            raise
        except Exception:
            log.exception("could not record a bank answer", extra={"bank": answer.bank_code})
            results.append((False, False))  # its lease lapses and the bank is asked again
    return results


def _record_answers_at_once(c: Connection, runner: Runner, answers: list[_Answer]) -> list[tuple[bool, bool]]:
    """Which tasks are still pending must not change before the writes below. SQLite (one
    writer, BEGIN IMMEDIATE) guarantees that by itself. Where writers run concurrently
    (PostgreSQL) the lookups are locked first, in id order: every change of a task's outcome
    happens under its lookup's lock
    (answers, failures, deadlines), so the pending set is stable, and batches of several replicas
    cannot deadlock. (A claim may still move a lapsed lease meanwhile; then this answer, which
    is as good as the next one, is recorded and the other replica's finds the task answered.)"""
    lookup_ids = sorted({answer.lookup_id for answer in answers})
    runner.lock(c, LOCK_LOOKUPS, {"lookup_ids": lookup_ids})
    pending: dict[tuple[str, str], tuple[str | None, int]] = {
        (lookup_id, bank_code): (owner, position)
        for lookup_id, bank_code, owner, position in PENDING_OF_LOOKUPS.run(c, {"lookup_ids": lookup_ids})
    }
    left = Counter(lookup_id for lookup_id, _ in pending)
    updates: list[dict[str, Any]] = []
    card_rows: list[dict[str, Any]] = []
    recorded: list[bool] = []
    last_recorded: dict[str, int] = {}
    for index, answer in enumerate(answers):
        lease = pending.get((answer.lookup_id, answer.bank_code))
        if lease is None or lease[0] != answer.owner:
            recorded.append(False)  # the lease was lost: someone else answers for this bank
            continue
        del pending[(answer.lookup_id, answer.bank_code)]  # a second answer in the batch is not
        left[answer.lookup_id] -= 1
        last_recorded[answer.lookup_id] = index
        recorded.append(True)
        debit = sum(1 for _, card in answer.cards if card.card_type == model.CardType.DEBIT)
        updates.append(
            {
                "k_lookup_id": answer.lookup_id,
                "k_bank_code": answer.bank_code,
                "v_card_count": len(answer.cards),
                "v_debit_count": debit,
                "v_credit_count": len(answer.cards) - debit,
                "v_latency_ms": answer.latency_ms,
                "v_update_time": answer.now,
            }
        )
        card_rows.extend(found_card_rows(answer.lookup_id, answer.bank_code, lease[1], answer.cards))
    if updates:
        RECORD_ANSWER.run_many(c, updates)
    if card_rows:
        INSERT_CARDS.run_many(c, card_rows)
    finished = {lookup_id: index for lookup_id, index in last_recorded.items() if left[lookup_id] == 0}
    written = _write_reports(
        c, {lookup_id: (answers[index].plan, answers[index].now) for lookup_id, index in finished.items()}
    )
    done = {finished[lookup_id] for lookup_id in written}
    return [(was_recorded, index in done) for index, was_recorded in enumerate(recorded)]


def _write_reports(c: Connection, finished: dict[str, tuple[PlanFactory, datetime]]) -> set[str]:
    """Complete these lookups (every bank is final) if they are still running: erase the sealed
    identity, write the one report and the report-ready notification. Each write is executed once
    for all of them. On PostgreSQL the caller has locked the lookup rows. Returns the lookups
    completed here."""
    if not finished:
        return set()
    running = RUNNING_OF_LOOKUPS.run(c, {"lookup_ids": sorted(finished)})
    if not running:
        return set()
    completions, reports, notifications = [], [], []
    for lookup_id, person_hash, sealed_contact in running:
        plan_factory, now = finished[lookup_id]
        plan = plan_factory()
        completions.append({"k_id": lookup_id, "v_complete_time": now, "v_report_id": plan.report_id})
        reports.append(
            {
                "id": plan.report_id,
                "lookup_id": lookup_id,
                "person_hash": person_hash,
                "generate_time": now,
                "expire_time": plan.expire_time,
            }
        )
        if sealed_contact is not None:
            notifications.append(
                {
                    "lookup_id": lookup_id,
                    "report_id": plan.report_id,
                    "sealed_contact": sealed_contact,
                    "create_time": now,
                }
            )
    COMPLETE_LOOKUP.run_many(c, completions)
    if notifications:
        INSERT_NOTIFICATIONS.run_many(c, notifications)
    INSERT_REPORTS.run_many(c, reports)
    bump(c, "reports_generated", len(running))
    return {lookup_id for lookup_id, _, _ in running}


def _finalize(
    s: Session,
    runner: Runner,
    lookup_id: str,
    plan: PlanFactory,
    now: datetime,
    force: bool,
) -> bool:
    """Write the lookup's one report if every bank is final (with force: mark the silent ones
    NO_RESPONSE first); erase the sealed identity. False if the lookup is not (yet) done."""
    c = s.connection()
    # Lock the lookup before reading its tasks: the same order as the answers (_take_leased_task).
    runner.lock(c, LOCK_LOOKUP, {"lookup_id": lookup_id})
    if force:
        c.execute(
            update(TASKS)
            .where(
                TASKS.c.lookup_id == lookup_id,
                TASKS.c.outcome == model.BankOutcome.PENDING,
                # Only while the lookup runs: a completed one keeps its outcomes as reported.
                select(LOOKUPS.c.id)
                .where(LOOKUPS.c.id == lookup_id, LOOKUPS.c.state == model.LookupState.RUNNING)
                .exists(),
            )
            .values(
                outcome=model.BankOutcome.NO_RESPONSE,
                failure_reason=case(
                    (TASKS.c.failure_reason == "", "no answer before the deadline"),
                    else_=TASKS.c.failure_reason,
                ),
                lease_owner=None,
                lease_until=None,
                update_time=now,
            )
        )
    elif _pending_tasks(c, lookup_id):
        return False
    return lookup_id in _write_reports(c, {lookup_id: (plan, now)})


def _take_leased_task(
    c: Connection, runner: Runner, lookup_id: str, bank_code: str, owner: str, **values: Any
) -> int | None:
    """Apply `values` to the task if `owner` still holds its lease and it is pending; its
    position in the report, or None if the lease was lost (someone else answers for it)."""
    # Lock the lookup first (the same order as _finalize): answers of one lookup recorded by
    # concurrent transactions then queue up, and the last one sees all the others when it
    # counts what is still pending. Without it two "last" answers could each miss the other.
    runner.lock(c, LOCK_LOOKUP, {"lookup_id": lookup_id})
    position = c.execute(
        update(TASKS)
        .where(
            TASKS.c.lookup_id == lookup_id,
            TASKS.c.bank_code == bank_code,
            TASKS.c.outcome == model.BankOutcome.PENDING,
            TASKS.c.lease_owner == owner,
        )
        .values(**values)
        .returning(TASKS.c.position)
    ).scalar()
    return None if position is None else int(position)
