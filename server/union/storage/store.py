"""The union's storage: one interface, chosen from the database URL.

`open_store(url)` is the single place that picks a backend. Both SQLite (the
embedded default) and PostgreSQL (production) run through SQLAlchemy; what
differs is how writers are kept from tripping over each other:

- SQLite: one writer thread per process and `BEGIN IMMEDIATE` write
  transactions, so a transaction never has to upgrade a read lock and
  "database is locked" cannot happen; WAL lets readers carry on meanwhile.
- PostgreSQL: a small thread pool, and bank work claimed with
  `FOR UPDATE SKIP LOCKED` so several union replicas share the queue.

Every public method is a coroutine; the SQL runs in the store's executor so the
event loop never blocks on the database.

Throughput: writes (and the watch reads) that queue up while the database is
busy share one transaction (`_run_batched`, `_core_batched`, SQLite), watch
reads that queue up share one on PostgreSQL too (`_core_read`), bank answers
that arrive together are recorded by one set of statements on both backends
(`_record_answers_together`), and the lookup hot path is SQLAlchemy Core with
its statements built once (`_Hot`). Those statements run on the driver's own
connection, sqlite3's or psycopg's (`prepared.Prepared`, values still converted
by the column types); on SQLite a batch of nothing but such work is one raw
transaction on the writer thread's own connection (`_core_batched`,
`_drain_core`), on PostgreSQL a Core transaction, instead of an ORM Session.
The rest stays ORM, where clarity wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.common import errors
from server.population.catalogue import BankInfo, RegionInfo
from server.union.domain import model
from server.union.storage.models import (
    AuditEventRow,
    BankRow,
    BankTaskRow,
    Base,
    CardActionRow,
    CardClosureRow,
    CounterRow,
    FoundCardRow,
    IdentityRow,
    LookupRow,
    NotificationRow,
    QuotaSlotRow,
    RegionRow,
    ReportRow,
    VerificationRow,
    VerifiedPersonRow,
)
from server.union.storage.prepared import Prepared, driver_connection

T = TypeVar("T")
log = logging.getLogger(__name__)
PlanFactory = Callable[[], model.ReportPlan]

# The tables the lookup hot path reads and writes in Core (see the lookups section).
LOOKUPS = cast(Table, LookupRow.__table__)
TASKS = cast(Table, BankTaskRow.__table__)
CARDS = cast(Table, FoundCardRow.__table__)
REPORTS = cast(Table, ReportRow.__table__)
NOTIFICATIONS = cast(Table, NotificationRow.__table__)
COUNTERS_TABLE = cast(Table, CounterRow.__table__)
AUDIT_EVENTS = cast(Table, AuditEventRow.__table__)
IDENTITIES = cast(Table, IdentityRow.__table__)


class _Hot:
    """The hot path's statements, built once: building a statement and its cache key on every
    call was a tenth of the SQLite thread's time (py-spy). Values go in as bound parameters."""

    # Everything CreateLookup checks, in one statement: the lookup this request_id made (if any),
    # whether one is running, when the latest completed.
    person_activity = Prepared(
        select(
            func.max(case((LOOKUPS.c.request_id == bindparam("request_id"), LOOKUPS.c.id))).label(
                "existing_id"
            ),
            func.count(case((LOOKUPS.c.state == model.LookupState.RUNNING, 1))).label("running"),
            func.max(LOOKUPS.c.complete_time).label("last_complete"),
            func.max(
                case((LOOKUPS.c.request_id == bindparam("request_id"), LOOKUPS.c.request_fingerprint))
            ).label("existing_fingerprint"),
        ).where(LOOKUPS.c.person_hash == bindparam("person_hash"))
    )
    # A lookup with its banks' progress in one statement (one row per bank).
    lookup_with_progress = Prepared(
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
    pending_of_lookups = Prepared(
        select(TASKS.c.lookup_id, TASKS.c.bank_code, TASKS.c.lease_owner, TASKS.c.position).where(
            TASKS.c.lookup_id.in_(bindparam("lookup_ids", expanding=True)),
            TASKS.c.outcome == model.BankOutcome.PENDING,
        )
    )
    lock_lookups = Prepared(
        select(LOOKUPS.c.id)
        .where(LOOKUPS.c.id.in_(bindparam("lookup_ids", expanding=True)))
        .order_by(LOOKUPS.c.id)
        .with_for_update()
    )
    # PostgreSQL: a person's CreateLookups take turns (the row lock is held to commit), so the
    # in-progress check and the cooldown are one decision. SQLite's single writer does the same.
    lock_person = Prepared(
        select(IDENTITIES.c.person_hash)
        .where(IDENTITIES.c.person_hash == bindparam("person_hash"))
        .with_for_update()
    )
    record_answer = Prepared(
        update(TASKS)
        .where(TASKS.c.lookup_id == bindparam("k_lookup_id"), TASKS.c.bank_code == bindparam("k_bank_code"))
        .values(
            outcome=model.BankOutcome.ANSWERED,
            card_count=bindparam("v_card_count"),
            debit_count=bindparam("v_debit_count"),
            credit_count=bindparam("v_credit_count"),
            latency_ms=bindparam("v_latency_ms"),
            failure_reason="",
            lease_owner=None,
            lease_until=None,
            update_time=bindparam("v_update_time"),
        )
    )
    running_of_lookups = Prepared(
        select(LOOKUPS.c.id, LOOKUPS.c.person_hash, LOOKUPS.c.sealed_contact).where(
            LOOKUPS.c.id.in_(bindparam("lookup_ids", expanding=True)),
            LOOKUPS.c.state == model.LookupState.RUNNING,
        )
    )
    complete_lookup = Prepared(
        update(LOOKUPS)
        .where(LOOKUPS.c.id == bindparam("k_id"))
        .values(
            state=model.LookupState.COMPLETED,
            complete_time=bindparam("v_time"),
            sealed_identity=None,
            sealed_contact=None,
            report_id=bindparam("v_report_id"),
        )
    )
    bump = Prepared(
        update(COUNTERS_TABLE)
        .where(COUNTERS_TABLE.c.name == bindparam("k_name"))
        .values(value=COUNTERS_TABLE.c.value + bindparam("v_by"))
    )
    insert_lookup = Prepared(insert(LOOKUPS))
    insert_tasks = Prepared(insert(TASKS))
    insert_cards = Prepared(insert(CARDS))
    insert_reports = Prepared(insert(REPORTS))
    insert_notifications = Prepared(insert(NOTIFICATIONS))
    insert_audit = Prepared(insert(AUDIT_EVENTS))


# How long a replica serves the bank and region catalogue from memory (admin changes made on
# another replica apply within this; the orchestrator re-reads banks on the same rhythm).
CATALOGUE_TTL = 1.0
# How long the first of a burst of bank answers waits for the others before they are written.
ANSWER_GATHER_SECONDS = 0.002

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class StoreUnavailable(errors.Unavailable):
    """The database could not be reached or answered with an operational error (UNAVAILABLE)."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "the service's database is unavailable; retry shortly", retry_after=timedelta(seconds=2)
        )
        self.detail = detail

    @classmethod
    def of(cls, error: BaseException) -> StoreUnavailable:
        """From a database error: the first line of the driver's message (the rest may quote SQL)."""
        cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
        return cls(str(cause).split("\n")[0])


class RequestMismatch(Exception):
    """This (person, request_id) already made something, from a different request (AIP-155)."""


class DuplicateRequest(Exception):
    """A resource with this (person, request_id) already exists (a racing retry)."""


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not pysqlite, issue BEGIN (so we can make it IMMEDIATE).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=8, max_overflow=4, pool_pre_ping=True)


class Store:
    """Durable state of the union. See the module docstring for the concurrency model."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._batch: list[_BatchItem] = []
        self._batch_lock = threading.Lock()
        self._batch_scheduled = False
        # PostgreSQL: hot-path reads waiting for the one read batch in flight (see _core_read).
        self._reads: list[_BatchItem] = []
        self._reads_draining = False
        self._answers: list[tuple[_Answer, asyncio.Future[tuple[bool, bool]]]] = []
        self._answers_scheduled = False
        self._answer_flushes: set[asyncio.Task[None]] = set()
        # Banks and regions, cached: (when read, rows). Cleared by this process's own changes; other
        # replicas' changes are seen within CATALOGUE_TTL.
        self._catalogue: dict[str, tuple[float, Any]] = {}
        self._catalogue_reads: dict[str, asyncio.Future[Any]] = {}
        self._catalogue_generation = 0
        self._executor = ThreadPoolExecutor(
            max_workers=1 if self.is_sqlite else 8, thread_name_prefix="union-db"
        )
        # SQLite: the writer thread's own connection for batches of Core work (see _drain_core).
        self._core_connection: Connection | None = None

    # -- plumbing -----------------------------------------------------------

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    async def _run(self, work: Callable[[Session], T]) -> T:
        """`work` in one transaction of an ORM Session, in the store's executor."""
        return await self._in_transaction(self._session, work)

    async def _in_transaction(
        self, begin: Callable[[], contextlib.AbstractContextManager[Any]], work: Callable[[Any], T]
    ) -> T:
        def in_thread() -> T:
            try:
                with begin() as target:
                    return work(target)
            except OperationalError as error:
                raise StoreUnavailable.of(error) from error

        return await asyncio.get_running_loop().run_in_executor(self._executor, in_thread)

    async def _core_batched(self, work: Callable[[Connection], T], savepoint: bool = True) -> T:
        """_run_batched for work that only runs Core statements on a Connection (the lookup hot
        path), which needs no ORM Session: on SQLite a batch of nothing but such work is one raw
        transaction (_drain_core); on PostgreSQL it is a Core transaction of its own (a Session's
        begin and commit were a tenth of the database threads' time there).
        Work that needs no savepoint of its own passes savepoint=False: reads (_core_read), which
        share the writer's next transaction on SQLite, and the answer batch, which sets its own."""
        if not self.is_sqlite:
            return await self._in_transaction(self.engine.begin, work)
        return cast(T, await self._enqueue(_BatchItem(work, savepoint, core=True)))

    async def _core_read(self, work: Callable[[Connection], T]) -> T:
        """A hot-path read (watches re-reading lookups as their banks answer, retried creates).
        Reads that queue up share one thread hop and one transaction: on SQLite the writer's next
        one (_core_batched); on PostgreSQL one read batch at a time, on one of the pool's
        connections (_drain_reads). There a transaction of its own per read was three round
        trips (pool ping, SELECT, COMMIT) and a thread wake-up each way, for one SELECT."""
        if self.is_sqlite:
            return await self._core_batched(work, savepoint=False)
        item = _BatchItem(work, savepoint=False, core=True)
        with self._batch_lock:
            self._reads.append(item)
            drain = not self._reads_draining
            self._reads_draining = True
        if drain:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(self._executor, self._drain_reads, loop)
        return cast(T, await item.future)

    def _drain_reads(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every queued read, in one transaction, until none is left (reads arriving meanwhile
        wait for the next round rather than take another thread: that is what batches them)."""
        while True:
            with self._batch_lock:
                items, self._reads = self._reads, []
                if not items:
                    self._reads_draining = False
                    return
            results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            try:
                with self.engine.connect() as c:
                    transaction = c.begin()
                    for item in items:
                        try:
                            results.append((item.future, item.work(c), None))
                        except OperationalError:
                            raise
                        except Exception as error:  # this read alone failed
                            results.append((item.future, None, error))
                            if transaction.is_active:  # a failed statement ends the transaction
                                transaction.rollback()
                            transaction = c.begin()
                    transaction.commit()
            except OperationalError as error:
                unavailable = StoreUnavailable.of(error)
                results = [(item.future, None, unavailable) for item in items]
            except Exception as error:
                results = [(item.future, None, error) for item in items]
            loop.call_soon_threadsafe(_settle_all, results)

    async def _run_batched(self, work: Callable[[Session], T]) -> T:
        """Like _run, but writes that queue up while the database is busy share one transaction
        (each in its own SAVEPOINT, so one failing write does not undo the others).

        Bank answers arrive in bursts (16 per lookup); committing them together is what lets one
        SQLite writer keep up. Each write still checks its own lease and finalises its own lookup.
        """
        if not self.is_sqlite:
            # PostgreSQL has many writers already; a batch would hold row locks of many lookups at
            # once, in arbitrary order, and deadlock with another batch.
            return await self._run(work)
        return cast(T, await self._enqueue(_BatchItem(work, savepoint=True, core=False)))

    async def _enqueue(self, item: _BatchItem) -> Any:
        loop = asyncio.get_running_loop()
        with self._batch_lock:
            self._batch.append(item)
            schedule = not self._batch_scheduled
            self._batch_scheduled = True
        if schedule:
            loop.run_in_executor(self._executor, self._drain_batch, loop)
        return await item.future

    def _drain_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._batch_lock:
            items, self._batch = self._batch, []
            self._batch_scheduled = False
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            if all(item.core for item in items):
                results = self._drain_core(items)
            else:
                with self._session() as session:
                    for item in items:
                        try:
                            target = session.connection() if item.core else session
                            if not item.savepoint:
                                results.append((item.future, item.work(target), None))
                                continue
                            with session.begin_nested():
                                results.append((item.future, item.work(target), None))
                        except OperationalError:
                            raise
                        except Exception as error:  # this write alone failed; its savepoint is rolled back
                            results.append((item.future, None, error))
        except OperationalError as error:
            unavailable = StoreUnavailable.of(error)
            results = [(item.future, None, unavailable) for item in items]
        except sqlite3.OperationalError as error:  # BEGIN or COMMIT of _drain_core
            unavailable = StoreUnavailable.of(error)
            results = [(item.future, None, unavailable) for item in items]
        except Exception as error:  # the commit itself failed: nothing of this batch was written
            results = [(item.future, None, error) for item in items]
        loop.call_soon_threadsafe(_settle_all, results)  # one wake-up of the loop for the batch

    def _drain_core(
        self, items: list[_BatchItem]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """A batch of Core work on SQLite, in one transaction that this thread's own connection
        begins, savepoints and commits itself. An ORM Session's begin/savepoint/commit bookkeeping
        was most of the writer thread's time (py-spy: 13 ms of database work per lookup, of
        which sqlite3 itself took 1.3). The hot statements run through Prepared, which never
        begins a SQLAlchemy transaction on this connection: BEGIN would fail inside ours."""
        if self._core_connection is None:
            self._core_connection = self.engine.connect()
        c = self._core_connection
        raw = driver_connection(c)
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        raw.execute("BEGIN IMMEDIATE")
        try:
            for item in items:
                try:
                    if not item.savepoint:
                        results.append((item.future, item.work(c), None))
                        continue
                    with _savepoint(c):
                        results.append((item.future, item.work(c), None))
                except (OperationalError, sqlite3.OperationalError):
                    raise
                except Exception as error:  # this write alone failed; its savepoint is rolled back
                    results.append((item.future, None, error))
            raw.execute("COMMIT")
        except BaseException:
            # Start the next batch on a fresh connection, whatever state this one was left in.
            self._core_connection = None
            try:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
            finally:
                c.close()
            raise
        return results

    async def _record_answers_together(self, answer: _Answer) -> tuple[bool, bool]:
        """Every bank answer waiting while the previous ones are written is recorded with them,
        by one set of statements (one SELECT of the leases, one UPDATE and one INSERT executed
        for many rows): statements per answer were most of the union's database time."""
        future: asyncio.Future[tuple[bool, bool]] = asyncio.get_running_loop().create_future()
        with self._batch_lock:
            self._answers.append((answer, future))
            schedule = not self._answers_scheduled
            self._answers_scheduled = True
        if schedule:
            task = asyncio.create_task(self._flush_answers(), name="record-answers")
            self._answer_flushes.add(task)
            task.add_done_callback(self._answer_flushes.discard)
        return await future

    def _take_answers(self) -> list[tuple[_Answer, asyncio.Future[tuple[bool, bool]]]]:
        with self._batch_lock:
            taken, self._answers = self._answers, []
            self._answers_scheduled = False
        return taken

    async def _flush_answers(self) -> None:
        taken: list[tuple[_Answer, asyncio.Future[tuple[bool, bool]]]] = []

        def work(c: Connection) -> list[tuple[bool, bool]]:
            # Taken in the writer thread as the write starts: whatever arrived while the writer
            # was busy joins this batch.
            taken.extend(self._take_answers())
            return _record_answers(c, [answer for answer, _ in taken], lock=not self.is_sqlite)

        try:
            # The other banks of a lookup answer within a few milliseconds of the first: waiting
            # that long lets one transaction record them, where an idle writer would otherwise
            # commit each answer on its own.
            await asyncio.sleep(ANSWER_GATHER_SECONDS)
            # No savepoint of its own: _record_answers sets its own, one answer apart if need be.
            results = await self._core_batched(work, savepoint=False)
        except BaseException as error:
            for _, future in taken or self._take_answers():
                if isinstance(error, asyncio.CancelledError):
                    future.cancel()  # shutting down: the answer's lease lapses and it is asked again
                else:
                    _settle(future, None, error)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        for (_, future), result in zip(taken, results, strict=True):
            _settle(future, result, None)

    def _insert_missing(self, model_class: type[Base]) -> Any:
        """INSERT that skips rows whose key exists: race-free when several replicas start at once."""
        if self.is_sqlite:
            return sqlite_insert(model_class).on_conflict_do_nothing()
        return postgresql_insert(model_class).on_conflict_do_nothing()

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        with self.engine.begin() as connection:
            if not self.is_sqlite:
                # Replicas starting together take turns (SQLite's BEGIN IMMEDIATE does the same there).
                connection.execute(text("SELECT pg_advisory_xact_lock(20211201)"))
            config = alembic_config(self.url)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    async def close(self) -> None:
        if self._core_connection is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._core_connection.close)
            self._core_connection = None
        self._executor.shutdown(wait=True)
        self.engine.dispose()

    async def ping(self) -> bool:
        try:
            await self._run(lambda s: s.execute(select(1)).scalar())
        except StoreUnavailable:
            return False
        return True

    # -- catalogue ----------------------------------------------------------

    async def seed_catalogue(
        self,
        banks: Sequence[BankInfo],
        addresses: dict[str, str],
        regions: Sequence[RegionInfo],
        now: datetime,
    ) -> None:
        """Insert banks and regions that are not there yet; never overwrite an operator's change."""

        bank_rows = [
            {
                "code": bank.code,
                "position": position,
                "name": bank.name,
                "english_name": bank.english_name,
                "address": addresses.get(bank.code, ""),
                "enabled": True,
                "interbank_code": bank.interbank_code,
                "tls_name": None,
            }
            for position, bank in enumerate(banks)
        ]
        region_rows = [
            {
                "code": region.code,
                "name": region.name,
                "open": region.pilot_open_date is not None,
                "open_time": now if region.pilot_open_date is not None else None,
                "pilot_batch": region.pilot_batch,
                "pilot_open_date": region.pilot_open_date,
            }
            for region in regions
        ]

        self._invalidate_catalogue()

        def work(s: Session) -> None:
            s.execute(self._insert_missing(BankRow), bank_rows)
            s.execute(self._insert_missing(RegionRow), region_rows)
            s.execute(self._insert_missing(CounterRow), [{"name": name, "value": 0} for name in COUNTERS])

        await self._run(work)

    async def set_bank_addresses(self, addresses: dict[str, str]) -> None:
        """Point banks at where they listen in this deployment (the demo's ports change per run)."""

        self._invalidate_catalogue()

        def work(s: Session) -> None:
            for code, address in addresses.items():
                s.execute(update(BankRow).where(BankRow.code == code).values(address=address))

        await self._run(work)

    async def identity_count(self) -> int:
        return await self._run(lambda s: s.scalar(select(func.count()).select_from(IdentityRow)) or 0)

    async def add_identities(self, rows: Iterable[tuple[str, str, str, str]]) -> None:
        """Insert (person_hash, name_hash, mobile_hash, region_code) rows, skipping known people."""
        batch = [
            {"person_hash": p, "name_hash": n, "mobile_hash": m, "region_code": r} for p, n, m, r in rows
        ]

        def work(s: Session) -> None:
            s.execute(self._insert_missing(IdentityRow), batch)

        await self._run(work)

    async def find_identity(self, person_hash: str) -> IdentityRow | None:
        return await self._run(lambda s: s.get(IdentityRow, person_hash))

    async def _cached(self, name: str, work: Callable[[Session], list[T]]) -> list[T]:
        """The catalogue read `name`, at most once per CATALOGUE_TTL: one read in flight at a
        time, which every caller that finds the copy stale waits for (not one read each)."""
        cached = self._catalogue.get(name)
        if cached is not None and time.monotonic() - cached[0] < CATALOGUE_TTL:
            return list(cached[1])
        reading = self._catalogue_reads.get(name)
        if reading is None:
            reading = asyncio.ensure_future(self._run(work))
            self._catalogue_reads[name] = reading
            generation = self._catalogue_generation

            def done(_: asyncio.Future[Any]) -> None:
                if self._catalogue_reads.get(name) is reading:
                    del self._catalogue_reads[name]
                unchanged = generation == self._catalogue_generation  # no change was made meanwhile
                if unchanged and not reading.cancelled() and reading.exception() is None:
                    self._catalogue[name] = (time.monotonic(), reading.result())

            reading.add_done_callback(done)
        rows: list[T] = await asyncio.shield(reading)
        return list(rows)

    def _invalidate_catalogue(self) -> None:
        """This process changed a bank or region: its next read goes to the database."""
        self._catalogue_generation += 1
        self._catalogue.clear()
        self._catalogue_reads.clear()

    async def list_banks(self) -> list[model.Bank]:
        """The bank catalogue, read at most once per CATALOGUE_TTL (every lookup needs it)."""

        def work(s: Session) -> list[model.Bank]:
            return [_bank(row) for row in s.scalars(select(BankRow).order_by(BankRow.position))]

        return await self._cached("banks", work)

    async def update_bank(self, code: str, enabled: bool | None, address: str | None) -> model.Bank | None:
        """Change what is given (not None): an update changes only the fields its mask names."""

        def work(s: Session) -> model.Bank | None:
            row = s.get(BankRow, code)
            if row is None:
                return None
            if enabled is not None:
                row.enabled = enabled
            if address:
                row.address = address
            return _bank(row)

        try:
            return await self._run(work)
        finally:
            self._invalidate_catalogue()

    async def list_regions(self) -> list[model.Region]:
        def work(s: Session) -> list[model.Region]:
            return [_region(row) for row in s.scalars(select(RegionRow).order_by(RegionRow.code))]

        return await self._cached("regions", work)

    async def get_region(self, code: str) -> model.Region | None:
        return next((region for region in await self.list_regions() if region.code == code), None)

    async def update_region(self, code: str, is_open: bool, now: datetime) -> model.Region | None:
        def work(s: Session) -> model.Region | None:
            row = s.get(RegionRow, code)
            if row is None:
                return None
            if is_open and not row.open:
                row.open_time = now
            if not is_open:
                row.open_time = None
            row.open = is_open
            return _region(row)

        try:
            return await self._run(work)
        finally:
            self._invalidate_catalogue()

    # -- banks joining (issue 22) -----------------------------------------------
    # Self-contained: uses only BankRow and _invalidate_catalogue.

    async def create_bank(self, new: model.NewBank) -> model.Bank | None:
        """Register a bank joining the service, enabled, after every bank there is (bank order
        is joining order). None if its code or CNAPS code is taken (a bank that left is kept,
        disabled, so its code stays taken). One transaction; every replica's catalogue copy
        picks it up within CATALOGUE_TTL, this one's at once."""

        def work(s: Session) -> model.Bank | None:
            taken = s.scalar(
                select(func.count())
                .select_from(BankRow)
                .where((BankRow.code == new.code) | (BankRow.interbank_code == new.interbank_code))
            )
            if taken:
                return None
            position = (s.scalar(select(func.max(BankRow.position))) or 0) + 1
            row = BankRow(
                code=new.code,
                position=position,
                name=new.name,
                english_name=new.english_name,
                address=new.address,
                enabled=True,
                interbank_code=new.interbank_code,
                tls_name=new.tls_name or None,
            )
            s.add(row)
            s.flush()
            return _bank(row)

        try:
            return await self._run(work)
        except IntegrityError:
            return None  # two operators registered the same code at once; the other one won
        finally:
            self._invalidate_catalogue()

    # -- verification -------------------------------------------------------

    async def add_verification(self, new: model.NewVerification) -> None:
        row = VerificationRow(
            id=new.id,
            person_hash=new.person_hash,
            region_code=new.region_code,
            sealed_identity=new.sealed_identity,
            code_hash=new.code_hash,
            create_time=new.create_time,
            expire_time=new.expire_time,
            failed_attempts=0,
            completed=False,
        )
        await self._run(lambda s: s.add(row))

    async def get_verification(self, verification_id: str) -> VerificationRow | None:
        return await self._run(lambda s: s.get(VerificationRow, verification_id))

    async def fail_verification_attempt(self, verification_id: str, max_attempts: int) -> int:
        """Count a wrong code; at the limit the sealed identity is erased. Returns attempts left."""

        def work(s: Session) -> int:
            row = s.get(VerificationRow, verification_id, with_for_update=not self.is_sqlite)
            if row is None:
                return 0
            row.failed_attempts += 1
            if row.failed_attempts >= max_attempts:
                row.sealed_identity = None
            return max(0, max_attempts - row.failed_attempts)

        return await self._run(work)

    async def complete_verification(self, verification_id: str, now: datetime) -> str | None:
        """Mark used (once) and hand back the sealed identity, erasing it from the row."""

        def work(s: Session) -> str | None:
            row = s.get(VerificationRow, verification_id, with_for_update=not self.is_sqlite)
            if row is None or row.completed or row.sealed_identity is None:
                return None
            sealed = row.sealed_identity
            row.completed = True
            row.sealed_identity = None
            if s.get(VerifiedPersonRow, row.person_hash) is None:
                s.add(VerifiedPersonRow(person_hash=row.person_hash, first_verify_time=now))
                _bump(s, "people_verified")
            return sealed

        return await self._run(work)

    async def erase_stale_verifications(self, now: datetime) -> int:
        """Expired verifications keep no sealed identity."""

        def work(s: Session) -> int:
            result = s.execute(
                update(VerificationRow)
                .where(VerificationRow.expire_time < now, VerificationRow.sealed_identity.is_not(None))
                .values(sealed_identity=None)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self._run(work)

    # -- lookups ------------------------------------------------------------
    #
    # The lookup hot path (create, record answers, finalise, watch reads) is written in SQLAlchemy
    # Core against the tables: at hundreds of lookups a second, the ORM's unit of work per row was
    # most of the union's database time.

    async def find_lookup_by_request(
        self, person_hash: str, request_id: str, request_fingerprint: str
    ) -> model.Lookup | None:
        """The lookup this person's `request_id` (a keyed hash) made, if any (AIP-155 retries);
        RequestMismatch if it was made by a different request."""

        def work(c: Connection) -> model.Lookup | None:
            existing, _, fingerprint = _person_activity(c, person_hash, request_id)
            _same_request(existing, fingerprint, request_fingerprint)
            return existing

        return await self._core_read(work)

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
            if not self.is_sqlite:
                _Hot.lock_person.run(c, {"person_hash": person_hash})
            existing, activity, fingerprint = _person_activity(c, person_hash, request_id)
            if existing is not None:
                _same_request(existing, fingerprint, request_fingerprint)
                return existing, [], False
            unasked: list[model.UnaskedBank] = []
            asked = list(banks)
            if admit is not None:
                activity = replace(activity, answered_banks=_answered_banks(c, person_hash))
                admission = admit(activity)
                if admission is not None:
                    asked, unasked = list(admission.banks), list(admission.unasked)
            _Hot.insert_lookup.run(
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
                    "unasked_banks": _unasked_to_json(unasked),
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
            _Hot.insert_tasks.run_many(c, rows)
            _bump(c, "lookups_created")
            for entry in [audit] if isinstance(audit, model.AuditEntry) else audit or ():
                _insert_audit(c, entry)
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
            return await self._core_batched(work)
        except IntegrityError as error:
            raise DuplicateRequest(request_id) from error

    async def get_lookup(self, lookup_id: str, person_hash: str | None) -> model.Lookup | None:
        """The lookup if it exists and (when person_hash is given) belongs to that person."""

        def work(c: Connection) -> model.Lookup | None:
            found = _read_lookup(c, lookup_id)
            if found is None or (person_hash is not None and found[0] != person_hash):
                return None
            return found[1]

        return await self._core_read(work)

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
            found = [_read_lookup(s.connection(), lookup_id) for lookup_id in list(ids)]
            return [lookup for _, lookup in filter(None, found)]

        # Not a hot-path read (a person asking for their list), so an ordinary transaction.
        return await self._run(work)

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
            if not self.is_sqlite:
                query = query.with_for_update(skip_locked=True, of=BankTaskRow)
            claims = []
            for task, sealed, deadline in s.execute(query):
                task.lease_owner = owner
                task.lease_until = now + lease
                task.attempt_count += 1
                claims.append(
                    model.Claim(task.lookup_id, task.bank_code, task.attempt_count, sealed, deadline)
                )
            return claims

        return await self._run(work)

    async def release_leases(self, owner: str) -> int:
        """Hand back this replica's unfinished claims (graceful shutdown) so others resume them now."""

        def work(s: Session) -> int:
            tasks = s.execute(
                update(BankTaskRow)
                .where(BankTaskRow.lease_owner == owner, BankTaskRow.outcome == model.BankOutcome.PENDING)
                .values(lease_owner=None, lease_until=None)
            )
            actions = s.execute(
                update(CardActionRow)
                .where(CardActionRow.lease_owner == owner, CardActionRow.state == model.ActionState.PENDING)
                .values(lease_owner=None, lease_until=None)
            )
            return int(tasks.rowcount) + int(actions.rowcount)  # type: ignore[attr-defined]

        return await self._run(work)

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
            if _take_leased_task(c, lookup_id, bank_code, owner, self.is_sqlite, **values) is None:
                return False, False
            if retry_at is not None:
                return True, False
            return True, _pending_tasks(c, lookup_id) == 0 and _finalize(
                s, lookup_id, plan, now, False, self.is_sqlite
            )

        return await self._run_batched(work)

    async def finalize_lookup(self, lookup_id: str, plan: PlanFactory, now: datetime, force: bool) -> bool:
        """Produce the lookup's one report once every bank is final (or, with force, mark the
        silent banks NO_RESPONSE first). Erases the sealed identity. False if not (yet) done."""

        def work(s: Session) -> bool:
            return _finalize(s, lookup_id, plan, now, force, self.is_sqlite)

        return await self._run(work)

    async def lookups_past_deadline(self, now: datetime, limit: int) -> list[str]:
        def work(s: Session) -> list[str]:
            return list(
                s.scalars(
                    select(LookupRow.id)
                    .where(LookupRow.state == model.LookupState.RUNNING, LookupRow.deadline_time <= now)
                    .limit(limit)
                )
            )

        return await self._run(work)

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

        return await self._run(work)

    async def next_due_time(self) -> datetime | None:
        """When the earliest pending task, card action or deadline falls due (the scheduler's sleep)."""

        def work(s: Session) -> datetime | None:
            task = s.scalar(
                select(_earliest_due(BankTaskRow)).where(BankTaskRow.outcome == model.BankOutcome.PENDING)
            )
            deadline = s.scalar(
                select(func.min(LookupRow.deadline_time)).where(LookupRow.state == model.LookupState.RUNNING)
            )
            action = s.scalar(
                select(_earliest_due(CardActionRow)).where(CardActionRow.state == model.ActionState.PENDING)
            )
            candidates = [t for t in (_utc(task), _utc(deadline), _utc(action)) if t is not None]
            return min(candidates) if candidates else None

        return await self._run(work)

    # -- reports ------------------------------------------------------------

    async def get_report(self, report_id: str, person_hash: str, now: datetime) -> model.Report | None:
        def work(s: Session) -> model.Report | None:
            row = s.get(ReportRow, report_id)
            if row is None or row.person_hash != person_hash or row.expire_time <= now:
                return None
            return _report(s, row)

        return await self._run(work)

    async def list_reports(
        self, person_hash: str, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[model.Report]:
        """Unexpired reports, newest first, keyset-paginated after (generate_time, id)."""

        def work(s: Session) -> list[model.Report]:
            query = select(ReportRow).where(ReportRow.person_hash == person_hash, ReportRow.expire_time > now)
            if after is not None:
                time, last_id = after
                query = query.where(
                    (ReportRow.generate_time < time)
                    | ((ReportRow.generate_time == time) & (ReportRow.id < last_id))
                )
            rows = s.scalars(query.order_by(ReportRow.generate_time.desc(), ReportRow.id.desc()).limit(limit))
            return [_report(s, row) for row in rows]

        return await self._run(work)

    async def delete_report(self, report_id: str, person_hash: str, now: datetime) -> bool:
        def work(s: Session) -> bool:
            row = s.get(ReportRow, report_id)
            if row is None or row.person_hash != person_hash or row.expire_time <= now:
                return False
            _delete_report_rows(s, row)
            return True

        return await self._run(work)

    async def purge_expired_reports(self, now: datetime, limit: int = 500) -> int:
        """Delete expired reports for good, with their cards and their lookups' tasks and counts."""

        def work(s: Session) -> int:
            rows = list(s.scalars(select(ReportRow).where(ReportRow.expire_time <= now).limit(limit)))
            for row in rows:
                _delete_report_rows(s, row)
            return len(rows)

        return await self._run(work)

    # -- retention: what is not covered by a report's own expiry ---------------
    #
    # Each purge deletes rows whose retention ended before `before` (the domain's RetentionPolicy
    # decides the cut-offs), at most `limit` at a time so one sweep never holds the writer long.

    async def purge_verifications(self, before: datetime, limit: int = 5000) -> int:
        """Verifications (pending, completed, refused) started before `before`."""
        return await self._purge(
            VerificationRow.__table__, VerificationRow.id, VerificationRow.create_time < before, limit
        )

    async def purge_card_actions(self, before: datetime, limit: int = 5000) -> int:
        """Closures and flags final since before `before`; a closure goes with its last item."""

        def work(s: Session) -> int:
            ids = list(
                s.scalars(
                    select(CardActionRow.id)
                    .where(
                        CardActionRow.state != model.ActionState.PENDING, CardActionRow.update_time < before
                    )
                    .limit(limit)
                )
            )
            if not ids:
                return 0
            closure_ids = set(
                s.scalars(select(CardActionRow.closure_id).where(CardActionRow.id.in_(ids)).distinct())
            )
            s.execute(delete(CardActionRow).where(CardActionRow.id.in_(ids)))
            closure_ids.discard(None)
            if closure_ids:
                emptied = select(CardActionRow.id).where(CardActionRow.closure_id == CardClosureRow.id)
                s.execute(delete(CardClosureRow).where(CardClosureRow.id.in_(closure_ids), ~emptied.exists()))
            return len(ids)

        return await self._run(work)

    async def purge_notifications(self, before: datetime, limit: int = 5000) -> int:
        """Report-ready messages that could not be sent since before `before`."""
        return await self._purge(
            NotificationRow.__table__, NotificationRow.lookup_id, NotificationRow.create_time < before, limit
        )

    async def purge_audit_events(self, before: datetime, limit: int = 5000) -> int:
        return await self._purge(
            AuditEventRow.__table__, AuditEventRow.id, AuditEventRow.time < before, limit
        )

    async def purge_verified_people(self, before: datetime, limit: int = 5000) -> int:
        """Who was first verified before `before` (the people_verified counter keeps the count)."""
        return await self._purge(
            VerifiedPersonRow.__table__,
            VerifiedPersonRow.person_hash,
            VerifiedPersonRow.first_verify_time < before,
            limit,
        )

    async def purge_quota_slots(self, before: datetime, limit: int = 5000) -> int:
        """Quota slots taken before `before` (a window's length ago: they limit nothing any more)."""

        def work(s: Session) -> int:
            result = s.execute(delete(QuotaSlotRow).where(QuotaSlotRow.time < before))
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self._run(work)

    async def _purge(self, table: Any, key: Any, expired: Any, limit: int) -> int:
        def work(s: Session) -> int:
            doomed = select(key).where(expired).limit(limit).scalar_subquery()
            result = s.execute(delete(table).where(key.in_(doomed)))
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self._run(work)

    # -- quotas -----------------------------------------------------------------

    async def take_quota_slot(
        self, key: str, limit: int, window: timedelta, now: datetime
    ) -> timedelta | None:
        """Take one of `key`'s `limit` slots for `window`: None if taken, else how long until one
        frees. One decision, exact under concurrency: each slot is claimed by a conditional upsert
        (insert it, or take it over if its time fell out of the window), and a slot that another
        transaction holds is waited for (PostgreSQL row lock; SQLite has one writer), then seen
        taken."""
        cutoff = now - window
        upsert = sqlite_insert if self.is_sqlite else postgresql_insert

        def work(s: Session) -> timedelta | None:
            for slot in range(limit):
                statement = (
                    upsert(QuotaSlotRow)
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
            oldest = _utc(oldest)
            return max(oldest + window - now, timedelta(seconds=1)) if oldest is not None else window

        return await self._run(work)

    # -- card actions (closures and "not mine" flags) ---------------------------

    async def report_card_sources(
        self, report_id: str, person_hash: str, now: datetime
    ) -> dict[str, model.ReportCardSource] | None:
        """The cards of one of the person's unexpired reports, keyed by card_ref; None if no such report."""

        def work(s: Session) -> dict[str, model.ReportCardSource] | None:
            row = s.get(ReportRow, report_id)
            if row is None or row.person_hash != person_hash or row.expire_time <= now:
                return None
            names: dict[str, str] = {
                code: name
                for code, name in s.execute(
                    select(BankTaskRow.bank_code, BankTaskRow.bank_name).where(
                        BankTaskRow.lookup_id == row.lookup_id
                    )
                )
            }
            cards = s.scalars(select(FoundCardRow).where(FoundCardRow.lookup_id == row.lookup_id))
            return {
                c.card_ref: model.ReportCardSource(
                    lookup_id=row.lookup_id,
                    card_ref=c.card_ref,
                    bank_code=c.bank_code,
                    bank_name=names.get(c.bank_code, c.bank_code),
                    bank_card_ref=c.bank_card_ref,
                    first_four=c.first_four,
                    last_four=c.last_four,
                    number_length=c.number_length,
                )
                for c in cards
            }

        return await self._run(work)

    async def create_card_closure(
        self,
        closure_id: str,
        person_hash: str,
        request_id: str,
        request_fingerprint: str,
        report_id: str,
        items: Sequence[tuple[str, model.ReportCardSource, str]],
        now: datetime,
        deadline: datetime,
    ) -> model.CardClosure:
        """Persist a closure and one pending action per card ((action_id, card, sealed identity))."""

        def work(s: Session) -> model.CardClosure:
            s.add(
                CardClosureRow(
                    id=closure_id,
                    person_hash=person_hash,
                    request_id=request_id,
                    request_fingerprint=request_fingerprint,
                    report_id=report_id,
                    create_time=now,
                )
            )
            for position, (action_id, card, sealed) in enumerate(items):
                s.add(
                    _action_row(
                        action_id,
                        model.ActionKind.CLOSE,
                        request_id,
                        person_hash,
                        card,
                        sealed,
                        now,
                        deadline,
                        position=position,
                        closure_id=closure_id,
                    )
                )
            s.flush()
            closure = _closure(s, s.get_one(CardClosureRow, closure_id))
            return closure

        try:
            return await self._run(work)
        except IntegrityError as error:
            raise DuplicateRequest(request_id) from error

    async def find_closure_by_request(
        self, person_hash: str, request_id: str, request_fingerprint: str
    ) -> model.CardClosure | None:
        """The closure this person's `request_id` (a keyed hash) made, if any; RequestMismatch if
        a different request made it."""

        def work(s: Session) -> model.CardClosure | None:
            row = s.scalar(
                select(CardClosureRow).where(
                    CardClosureRow.person_hash == person_hash, CardClosureRow.request_id == request_id
                )
            )
            if row is None:
                return None
            _same_request(row, row.request_fingerprint, request_fingerprint)
            return _closure(s, row)

        return await self._run(work)

    async def get_card_closure(self, closure_id: str, person_hash: str) -> model.CardClosure | None:
        def work(s: Session) -> model.CardClosure | None:
            row = s.get(CardClosureRow, closure_id)
            if row is None or row.person_hash != person_hash:
                return None
            return _closure(s, row)

        return await self._run(work)

    async def list_card_closures(
        self, person_hash: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[model.CardClosure]:
        def work(s: Session) -> list[model.CardClosure]:
            query = select(CardClosureRow).where(CardClosureRow.person_hash == person_hash)
            if after is not None:
                time, last_id = after
                query = query.where(
                    (CardClosureRow.create_time < time)
                    | ((CardClosureRow.create_time == time) & (CardClosureRow.id < last_id))
                )
            rows = s.scalars(
                query.order_by(CardClosureRow.create_time.desc(), CardClosureRow.id.desc()).limit(limit)
            )
            return [_closure(s, row) for row in rows]

        return await self._run(work)

    async def create_flag(
        self,
        action_id: str,
        person_hash: str,
        request_id: str,
        request_fingerprint: str,
        card: model.ReportCardSource,
        sealed_identity: str,
        now: datetime,
        deadline: datetime,
    ) -> tuple[model.CardAction, bool]:
        """The card's flag: a new one, or the one already raised (a card is flagged once). (flag, created)

        `request_id` is a keyed hash of the person and their request_id: if it already made a flag,
        that flag is returned when it was the same request, and RequestMismatch raised otherwise."""
        flag_key = f"{card.lookup_id}:{card.card_ref}"

        def existing(s: Session) -> model.CardAction | None:
            same_request = s.scalar(select(CardActionRow).where(CardActionRow.flag_request == request_id))
            if same_request is not None:
                _same_request(same_request, same_request.request_fingerprint, request_fingerprint)
                return _action(same_request)
            row = s.scalar(select(CardActionRow).where(CardActionRow.flag_key == flag_key))
            return None if row is None else _action(row)

        def work(s: Session) -> tuple[model.CardAction, bool]:
            found = existing(s)
            if found is not None:
                return found, False
            row = _action_row(
                action_id,
                model.ActionKind.FLAG,
                request_id,
                person_hash,
                card,
                sealed_identity,
                now,
                deadline,
                position=0,
                flag_key=flag_key,
                flag_request=request_id,
                request_fingerprint=request_fingerprint,
            )
            s.add(row)
            s.flush()
            return _action(row), True

        try:
            return await self._run(work)
        except IntegrityError:
            # Another request flagged the same card at the same moment; it won.
            found = await self._run(existing)
            if found is None:
                raise
            return found, False

    async def get_card_action(self, action_id: str) -> model.CardAction | None:
        def work(s: Session) -> model.CardAction | None:
            row = s.get(CardActionRow, action_id)
            return None if row is None else _action(row)

        return await self._run(work)

    async def claim_due_actions(
        self, owner: str, now: datetime, lease: timedelta, limit: int
    ) -> list[model.ActionClaim]:
        def work(s: Session) -> list[model.ActionClaim]:
            query = (
                select(CardActionRow)
                .where(
                    CardActionRow.state == model.ActionState.PENDING,
                    CardActionRow.next_attempt_time <= now,
                    (CardActionRow.lease_until.is_(None)) | (CardActionRow.lease_until < now),
                    CardActionRow.deadline_time > now,
                )
                .order_by(CardActionRow.next_attempt_time)
                .limit(limit)
            )
            if not self.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            claims = []
            for row in s.scalars(query):
                row.lease_owner = owner
                row.lease_until = now + lease
                row.attempt_count += 1
                claims.append(
                    model.ActionClaim(
                        action_id=row.id,
                        kind=model.ActionKind(row.kind),
                        closure_id=row.closure_id,
                        person_hash=row.person_hash,
                        bank_code=row.bank_code,
                        bank_card_ref=row.bank_card_ref,
                        attempt=row.attempt_count,
                        sealed_identity=row.sealed_identity,
                        deadline_time=row.deadline_time,
                    )
                )
            return claims

        return await self._run(work)

    async def record_action(
        self,
        action_id: str,
        owner: str,
        state: model.ActionState,
        ticket: str,
        reason: str,
        retry_at: datetime | None,
        now: datetime,
    ) -> model.CardAction | None:
        """The bank's answer (final: the sealed identity is erased), or a retry at `retry_at`.
        Only the lease holder may write; returns the action if this call finalised it."""

        def work(s: Session) -> model.CardAction | None:
            row = s.get(CardActionRow, action_id, with_for_update=not self.is_sqlite)
            if row is None or row.state != model.ActionState.PENDING or row.lease_owner != owner:
                return None
            row.lease_owner = None
            row.lease_until = None
            row.reason = reason[:255]
            row.update_time = now
            if retry_at is not None and state == model.ActionState.PENDING:
                row.next_attempt_time = retry_at
                return None
            row.state = state
            row.ticket = ticket[:64]
            row.sealed_identity = None
            return _action(row)

        return await self._run(work)

    async def fail_overdue_actions(self, now: datetime, limit: int = 200) -> list[model.CardAction]:
        def work(s: Session) -> list[model.CardAction]:
            rows = list(
                s.scalars(
                    select(CardActionRow)
                    .where(
                        CardActionRow.state == model.ActionState.PENDING, CardActionRow.deadline_time <= now
                    )
                    .limit(limit)
                )
            )
            for row in rows:
                row.state = model.ActionState.FAILED
                row.reason = row.reason or "the bank did not answer in time"
                row.sealed_identity = None
                row.lease_owner = None
                row.lease_until = None
                row.update_time = now
            return [_action(row) for row in rows]

        return await self._run(work)

    # -- audit trail and notifications -----------------------------------------

    async def add_audit_event(
        self, time: datetime, actor: str, action: str, outcome: str, resource: str
    ) -> None:
        def work(s: Session) -> None:
            _insert_audit(s.connection(), model.AuditEntry(time, actor, action, outcome, resource))

        # Batched with the other writes of the moment: every lookup and report read is audited.
        await self._run_batched(work)

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

        return await self._run(work)

    async def pending_notifications(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """(lookup_id, report_id, sealed_contact) of reports not yet announced."""

        def work(s: Session) -> list[tuple[str, str, str]]:
            rows = s.scalars(select(NotificationRow).order_by(NotificationRow.create_time).limit(limit))
            return [(r.lookup_id, r.report_id, r.sealed_contact) for r in rows]

        return await self._run(work)

    async def delete_notifications(self, lookup_ids: Sequence[str]) -> int:
        """Drop the outbox rows of these lookups (their messages went out)."""
        if not lookup_ids:
            return 0

        def work(s: Session) -> int:
            result = s.execute(delete(NotificationRow).where(NotificationRow.lookup_id.in_(lookup_ids)))
            return int(result.rowcount)  # type: ignore[attr-defined]

        return await self._run_batched(work)

    # -- statistics ---------------------------------------------------------

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

        return await self._run(work)

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
                people_verified=s.scalar(select(func.count()).select_from(VerifiedPersonRow)) or 0,
                lookups_created=counters.get("lookups_created", 0),
                reports_generated=counters.get("reports_generated", 0),
                lookups_overdue=s.scalar(select(func.count()).where(running, LookupRow.deadline_time <= now))
                or 0,
                bank_tasks_waiting={code: int(count) for code, count in waiting},
                bank_deadline_misses={code: int(count) for code, count in missed},
            )

        return await self._run(work)


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


# -- row → domain helpers ----------------------------------------------------


COUNTERS = ("lookups_created", "reports_generated", "people_verified")


def _bump(s: Session | Connection, name: str, by: int = 1) -> None:
    # One atomic UPDATE: concurrent transactions never race on a read-modify-write.
    # The rows exist from seed_catalogue on.
    c = s.connection() if isinstance(s, Session) else s
    _Hot.bump.run(c, {"k_name": name, "v_by": by})


def _earliest_due(row: type[BankTaskRow] | type[CardActionRow]) -> Any:
    """When the first of these rows falls due. One in flight is not due before its lease lapses,
    whatever its next_attempt_time says."""
    return func.min(
        case((row.lease_until > row.next_attempt_time, row.lease_until), else_=row.next_attempt_time)
    )


def _insert_audit(c: Connection, entry: model.AuditEntry) -> None:
    _Hot.insert_audit.run(
        c,
        {
            "time": entry.time,
            "actor": entry.actor,
            "action": entry.action,
            "outcome": entry.outcome[:64],
            "resource": entry.resource[:96],
        },
    )


@dataclass
class _BatchItem:
    """One piece of work waiting for the SQLite writer: ORM work takes a Session, Core work
    (`core`) a Connection; `savepoint` puts a write in its own, so one failure spares the batch."""

    work: Callable[[Any], Any]
    savepoint: bool
    core: bool
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


_savepoint_names = itertools.count()


@contextlib.contextmanager
def _savepoint(c: Connection) -> Iterator[None]:
    """A SAVEPOINT around Core work: SQLAlchemy's own inside a transaction it runs, else a raw one
    inside the transaction a _drain_core batch began on the driver connection."""
    if c.in_transaction():
        with c.begin_nested():
            yield
        return
    raw = driver_connection(c)
    name = f"core_{next(_savepoint_names)}"
    raw.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        raw.execute(f"ROLLBACK TO {name}")
        raw.execute(f"RELEASE {name}")
        raise
    raw.execute(f"RELEASE {name}")


def _settle_all(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, failure in results:
        _settle(future, value, failure)


def _settle(future: asyncio.Future[Any], value: Any, failure: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if failure is None:
        future.set_result(value)
    else:
        future.set_exception(failure)


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


@dataclass(frozen=True)
class _Answer:
    """A bank's complete answer, waiting to be recorded (see Store.record_answer)."""

    lookup_id: str
    bank_code: str
    owner: str
    cards: Sequence[tuple[str, model.MaskedCard]]
    latency_ms: int
    now: datetime
    plan: PlanFactory


def _record_answers(c: Connection, answers: list[_Answer], lock: bool) -> list[tuple[bool, bool]]:
    """(recorded, report written) for each answer. All in one savepoint; should that fail, each
    answer in its own, so that one bad answer cannot lose the others."""
    try:
        with _savepoint(c):
            return _record_answers_at_once(c, answers, lock)
    except OperationalError:
        raise
    except Exception:
        if len(answers) == 1:
            raise
    results: list[tuple[bool, bool]] = []
    for answer in answers:
        try:
            with _savepoint(c):
                results.append(_record_answers_at_once(c, [answer], lock)[0])
        except OperationalError:
            raise
        except Exception:
            log.exception("could not record a bank answer", extra={"bank": answer.bank_code})
            results.append((False, False))  # its lease lapses and the bank is asked again
    return results


def _person_activity(
    c: Connection, person_hash: str, request_id: str
) -> tuple[model.Lookup | None, model.PersonActivity, str | None]:
    """In one statement: the lookup this person's `request_id` made (if any) with the fingerprint
    of the request that made it, and what admitting a new one depends on."""
    [(existing_id, running, last, fingerprint)] = _Hot.person_activity.run(
        c, {"person_hash": person_hash, "request_id": request_id}
    )
    found = _read_lookup(c, existing_id) if existing_id is not None else None
    return (found[1] if found else None), model.PersonActivity(bool(running), _utc(last)), fingerprint


def _same_request(existing: object | None, stored: str | None, asked: str) -> None:
    """AIP-155: a request_id names one request. Rows from before fingerprints were kept have none."""
    if existing is not None and stored is not None and stored != asked:
        raise RequestMismatch()


def _record_answers_at_once(c: Connection, answers: list[_Answer], lock: bool) -> list[tuple[bool, bool]]:
    """Which tasks are still pending must not change before the writes below. SQLite (one
    writer, BEGIN IMMEDIATE) guarantees that by itself. With `lock` (PostgreSQL) the lookups are
    locked first, in id order: every change of a task's outcome happens under its lookup's lock
    (answers, failures, deadlines), so the pending set is stable, and batches of several replicas
    cannot deadlock. (A claim may still move a lapsed lease meanwhile; then this answer, which
    is as good as the next one, is recorded and the other replica's finds the task answered.)"""
    lookup_ids = sorted({answer.lookup_id for answer in answers})
    if lock:
        _Hot.lock_lookups.run(c, {"lookup_ids": lookup_ids})
    pending: dict[tuple[str, str], tuple[str | None, int]] = {
        (lookup_id, bank_code): (owner, position)
        for lookup_id, bank_code, owner, position in _Hot.pending_of_lookups.run(
            c, {"lookup_ids": lookup_ids}
        )
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
        card_rows.extend(
            {
                "lookup_id": answer.lookup_id,
                "card_ref": card.card_ref,
                "bank_code": answer.bank_code,
                "position": lease[1],
                "bank_card_ref": bank_card_ref,
                "card_type": card.card_type,
                "first_four": card.first_four,
                "last_four": card.last_four,
                "number_length": card.number_length,
                "status": card.status,
            }
            for bank_card_ref, card in answer.cards
        )
    if updates:
        _Hot.record_answer.run_many(c, updates)
    if card_rows:
        _Hot.insert_cards.run_many(c, card_rows)
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
    running = _Hot.running_of_lookups.run(c, {"lookup_ids": sorted(finished)})
    if not running:
        return set()
    completions, reports, notifications = [], [], []
    for lookup_id, person_hash, sealed_contact in running:
        plan_factory, now = finished[lookup_id]
        plan = plan_factory()
        completions.append({"k_id": lookup_id, "v_time": now, "v_report_id": plan.report_id})
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
    _Hot.complete_lookup.run_many(c, completions)
    if notifications:
        _Hot.insert_notifications.run_many(c, notifications)
    _Hot.insert_reports.run_many(c, reports)
    _bump(c, "reports_generated", len(running))
    return {lookup_id for lookup_id, _, _ in running}


def _finalize(
    s: Session,
    lookup_id: str,
    plan: PlanFactory,
    now: datetime,
    force: bool,
    is_sqlite: bool,
) -> bool:
    """Write the lookup's one report if every bank is final (with force: mark the silent ones
    NO_RESPONSE first); erase the sealed identity. False if the lookup is not (yet) done."""
    c = s.connection()
    if not is_sqlite:
        # Lock the lookup before reading its tasks: the same order as the answers (_take_leased_task).
        c.execute(select(LOOKUPS.c.id).where(LOOKUPS.c.id == lookup_id).with_for_update())
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
    c: Connection, lookup_id: str, bank_code: str, owner: str, is_sqlite: bool, **values: Any
) -> int | None:
    """Apply `values` to the task if `owner` still holds its lease and it is pending; its
    position in the report, or None if the lease was lost (someone else answers for it)."""
    if not is_sqlite:
        # Lock the lookup first (the same order as _finalize): answers of one lookup recorded by
        # concurrent transactions then queue up, and the last one sees all the others when it
        # counts what is still pending. Without it two "last" answers could each miss the other.
        c.execute(select(LOOKUPS.c.id).where(LOOKUPS.c.id == lookup_id).with_for_update())
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


def _utc(value: datetime | None) -> datetime | None:
    """Core reads through the typed columns already give aware UTC; this guards aggregates
    (max() loses the column type on some backends)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _read_lookup(c: Connection, lookup_id: str) -> tuple[str, model.Lookup] | None:
    """(owner's person_hash, the lookup with its banks' progress), or None if there is none."""
    rows = _Hot.lookup_with_progress.run(c, {"lookup_id": lookup_id})
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
        report_expire_time=_utc(first.report_expire_time),
        unasked=_unasked_from_json(first.unasked_banks),
    )
    return first.person_hash, lookup


def _delete_report_rows(s: Session, row: ReportRow) -> None:
    """A report goes with everything its lookup kept: cards, per-bank tasks and counts, the lookup
    itself, and an announcement not yet sent. Card actions keep their own copy (and retention)."""
    lookup_id = row.lookup_id
    s.execute(delete(FoundCardRow).where(FoundCardRow.lookup_id == lookup_id))
    s.execute(delete(NotificationRow).where(NotificationRow.lookup_id == lookup_id))
    s.execute(delete(BankTaskRow).where(BankTaskRow.lookup_id == lookup_id))
    s.delete(row)
    s.execute(delete(LookupRow).where(LookupRow.id == lookup_id))


def _bank(row: BankRow) -> model.Bank:
    return model.Bank(
        row.code,
        row.name,
        row.english_name,
        row.address,
        row.enabled,
        row.position,
        row.interbank_code or "",
        row.tls_name or "",
    )


def _region(row: RegionRow) -> model.Region:
    return model.Region(row.code, row.name, row.open, row.open_time, row.pilot_batch, row.pilot_open_date)


def _action_row(
    action_id: str,
    kind: model.ActionKind,
    request_id: str,
    person_hash: str,
    card: model.ReportCardSource,
    sealed_identity: str,
    now: datetime,
    deadline: datetime,
    position: int,
    closure_id: str | None = None,
    flag_key: str | None = None,
    flag_request: str | None = None,
    request_fingerprint: str | None = None,
) -> CardActionRow:
    return CardActionRow(
        id=action_id,
        kind=kind,
        closure_id=closure_id,
        flag_key=flag_key,
        flag_request=flag_request,
        request_fingerprint=request_fingerprint,
        request_id=request_id,
        person_hash=person_hash,
        lookup_id=card.lookup_id,
        position=position,
        card_ref=card.card_ref,
        bank_code=card.bank_code,
        bank_name=card.bank_name,
        bank_card_ref=card.bank_card_ref,
        first_four=card.first_four,
        last_four=card.last_four,
        number_length=card.number_length,
        state=model.ActionState.PENDING,
        ticket="",
        reason="",
        sealed_identity=sealed_identity,
        attempt_count=0,
        next_attempt_time=now,
        deadline_time=deadline,
        create_time=now,
        update_time=now,
    )


def _action(row: CardActionRow) -> model.CardAction:
    return model.CardAction(
        id=row.id,
        kind=model.ActionKind(row.kind),
        card_ref=row.card_ref,
        bank_code=row.bank_code,
        bank_name=row.bank_name,
        first_four=row.first_four,
        last_four=row.last_four,
        number_length=row.number_length,
        state=model.ActionState(row.state),
        ticket=row.ticket,
        reason=row.reason,
        create_time=row.create_time,
        update_time=row.update_time,
    )


def _closure(s: Session, row: CardClosureRow) -> model.CardClosure:
    items = s.scalars(
        select(CardActionRow).where(CardActionRow.closure_id == row.id).order_by(CardActionRow.position)
    )
    return model.CardClosure(row.id, row.report_id, row.create_time, [_action(i) for i in items])


def _report(s: Session, row: ReportRow) -> model.Report:
    found = _read_lookup(s.connection(), row.lookup_id)
    banks = found[1].banks if found else []
    names = {b.bank_code: b.bank_name for b in banks}
    cards = [
        model.MaskedCard(
            card_ref=c.card_ref,
            bank_code=c.bank_code,
            bank_name=names.get(c.bank_code, c.bank_code),
            card_type=model.CardType(c.card_type),
            first_four=c.first_four,
            last_four=c.last_four,
            number_length=c.number_length,
            status=model.CardStatus(c.status),
        )
        for c in s.scalars(
            select(FoundCardRow)
            .where(FoundCardRow.lookup_id == row.lookup_id)
            .order_by(FoundCardRow.position, FoundCardRow.card_type.desc(), FoundCardRow.card_ref)
        )
    ]
    flags: dict[str, model.CardAction] = {}
    closures: dict[str, model.CardAction] = {}
    actions = s.scalars(
        select(CardActionRow)
        .where(CardActionRow.lookup_id == row.lookup_id)
        .order_by(CardActionRow.create_time)
    )
    for action_row in actions:
        action = _action(action_row)
        (flags if action.kind == model.ActionKind.FLAG else closures)[action.card_ref] = action
    cards = [replace(c, flag=flags.get(c.card_ref), closure=closures.get(c.card_ref)) for c in cards]
    unasked = found[1].unasked if found else []
    return model.Report(row.id, row.lookup_id, row.generate_time, row.expire_time, banks, cards, unasked)


def open_store(url: str) -> Store:
    """The one place a backend is chosen: sqlite:/// (embedded) or postgresql+psycopg:// (production)."""
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database backend {backend!r}: use sqlite:/// or postgresql+psycopg://")
    return Store(url)


# -- per-bank cooldown and unasked banks (issue 22) -----------------------------
# Self-contained helpers of create_lookup and _read_lookup.

# Per bank: when the latest of the person's completed lookups that the bank answered completed.
_ANSWERED_BANKS = Prepared(
    select(TASKS.c.bank_code, func.max(LOOKUPS.c.complete_time).label("last_answered"))
    .select_from(LOOKUPS.join(TASKS, TASKS.c.lookup_id == LOOKUPS.c.id))
    .where(
        LOOKUPS.c.person_hash == bindparam("person_hash"),
        LOOKUPS.c.state == model.LookupState.COMPLETED,
        TASKS.c.outcome == model.BankOutcome.ANSWERED,
    )
    .group_by(TASKS.c.bank_code)
)


def _answered_banks(c: Connection, person_hash: str) -> dict[str, datetime]:
    """What the per-bank re-query cooldown depends on, read in the creating transaction (after
    the person's row lock on PostgreSQL), so the decision is exact under concurrent requests."""
    rows = _ANSWERED_BANKS.run(c, {"person_hash": person_hash})
    return {code: when for code, last in rows if (when := _utc(last)) is not None}


def _unasked_to_json(unasked: Sequence[model.UnaskedBank]) -> str | None:
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


def _unasked_from_json(text: str | None) -> list[model.UnaskedBank]:
    if not text:
        return []
    return [
        model.UnaskedBank(
            code, name, model.UnaskedReason(reason), datetime.fromisoformat(when) if when else None
        )
        for code, name, reason, when in json.loads(text)
    ]
