"""Where the union's SQL runs, and the one place that knows SQLite from PostgreSQL.

Every aggregate's storage module (catalogue_store, identity_store, lookup_store, ...)
hands its work to a `Runner` as a function of an ORM Session or a Core Connection;
the runner decides how that work meets the database:

- SQLite: one writer thread per process and `BEGIN IMMEDIATE` write
  transactions, so a transaction never has to upgrade a read lock and
  "database is locked" cannot happen; WAL lets readers carry on meanwhile.
  Writes (and the hot reads) that queue up while the writer is busy share one
  transaction, each in its own SAVEPOINT (`run_batched`, `core_batched`); a
  batch of nothing but Core work is one raw transaction on the writer thread's
  own sqlite3 connection (`_drain_core`), without an ORM Session's bookkeeping.
- PostgreSQL: a pool of connections and a small thread pool; work claimed with
  `FOR UPDATE SKIP LOCKED` (`skip_locked`) and rows locked before they are
  changed (`lock`, `get_locked`), so several union replicas share the queue.
  Hot reads that queue up share one transaction (`core_read`).

The aggregates never ask which backend they run on: what differs is asked of
the runner (`insert_missing`, `upsert`, `skip_locked`, `lock`, `get_locked`).
Every public coroutine runs the SQL in the runner's executor, so the event
loop never blocks on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, Select, Table, create_engine, event, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.union.domain.ports import StoreUnavailable
from server.union.storage.models import Base
from server.union.storage.prepared import Prepared, driver_connection, send_arrays_in_binary

T = TypeVar("T")
Q = TypeVar("Q")
RowT = TypeVar("RowT", bound=Base)
Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def unavailable(error: BaseException) -> StoreUnavailable:
    """From a database error: the first line of the driver's message (the rest may quote SQL)."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    return StoreUnavailable(str(cause).split("\n")[0])


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
    engine = create_engine(url, pool_size=8, max_overflow=4, pool_pre_ping=True)
    send_arrays_in_binary(engine)
    return engine


@dataclass
class BatchItem:
    """One piece of work waiting for the SQLite writer: ORM work takes a Session, Core work
    (`core`) a Connection; `savepoint` puts a write in its own, so one failure spares the batch."""

    work: Callable[[Any], Any]
    savepoint: bool
    core: bool
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Runner:
    """Runs storage work on one database: see the module docstring for the concurrency model."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._batch: list[BatchItem] = []
        self._batch_lock = threading.Lock()
        self._batch_scheduled = False
        # PostgreSQL: hot-path reads waiting for the one read batch in flight (see core_read).
        self._reads: list[BatchItem] = []
        self._reads_draining = False
        self._pool = ThreadPoolExecutor(max_workers=1 if self.is_sqlite else 8, thread_name_prefix="union-db")
        self._executor: Executor = self._pool
        # SQLite: the writer thread's own connection for batches of Core work (see _drain_core).
        self._core_connection: Connection | None = None

    # -- what differs between the backends, asked by the aggregates ------------

    def insert_missing(self, model_class: type[Base]) -> Any:
        """INSERT that skips rows whose key exists: race-free when several replicas start at once."""
        return self.upsert(model_class).on_conflict_do_nothing()

    def upsert(self, model_class: type[Base] | Table) -> Any:
        """The backend's INSERT with ON CONFLICT (both spell it alike; the constructs differ)."""
        return sqlite_insert(model_class) if self.is_sqlite else postgresql_insert(model_class)

    def skip_locked(self, query: Q, of: Any = None) -> Q:
        """Rows being claimed: on PostgreSQL locked, skipping those another replica is claiming;
        SQLite's one writer claims alone."""
        if self.is_sqlite:
            return query
        return cast(Q, cast(Select[Any], query).with_for_update(skip_locked=True, of=of))

    def lock(self, c: Connection, statement: Prepared, params: dict[str, Any]) -> None:
        """Run `statement` (a SELECT ... FOR UPDATE) where writers run concurrently (PostgreSQL),
        so the writers of these rows take turns until commit. SQLite's writer is alone already."""
        if not self.is_sqlite:
            statement.run(c, params)

    def get_locked(self, s: Session, model_class: type[RowT], key: Any) -> RowT | None:
        """The row by key, locked to this transaction where writers run concurrently."""
        return s.get(model_class, key, with_for_update=not self.is_sqlite)

    # -- running work ------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def wrap_executor(self, wrap: Callable[[ThreadPoolExecutor], Executor]) -> None:
        """Run the SQL through `wrap(pool)` (tracing: each statement in the context, and so the
        trace, of the call that submitted it)."""
        self._executor = wrap(self._pool)

    async def run(self, work: Callable[[Session], T]) -> T:
        """`work` in one transaction of an ORM Session, in the runner's executor."""
        return await self._in_transaction(self.session, work)

    async def _in_transaction(
        self, begin: Callable[[], contextlib.AbstractContextManager[Any]], work: Callable[[Any], T]
    ) -> T:
        def in_thread() -> T:
            try:
                with begin() as target:
                    return work(target)
            except OperationalError as error:
                raise unavailable(error) from error

        return await asyncio.get_running_loop().run_in_executor(self._executor, in_thread)

    async def core_batched(self, work: Callable[[Connection], T], savepoint: bool = True) -> T:
        """run_batched for work that only runs Core statements on a Connection (the lookup hot
        path), which needs no ORM Session: on SQLite a batch of nothing but such work is one raw
        transaction (_drain_core); on PostgreSQL it is a Core transaction of its own.
        Work that needs no savepoint of its own passes savepoint=False: reads (core_read), which
        share the writer's next transaction on SQLite, and work that sets its own savepoints."""
        if not self.is_sqlite:
            return await self._in_transaction(self.engine.begin, work)
        return cast(T, await self._enqueue(BatchItem(work, savepoint, core=True)))

    async def core_read(self, work: Callable[[Connection], T]) -> T:
        """A hot-path read (watches re-reading lookups as their banks answer, retried creates).
        Reads that queue up share one thread hop and one transaction: on SQLite the writer's next
        one (core_batched); on PostgreSQL one read batch at a time, on one of the pool's
        connections (_drain_reads), rather than a pool ping, SELECT and COMMIT per read."""
        if self.is_sqlite:
            return await self.core_batched(work, savepoint=False)
        item = BatchItem(work, savepoint=False, core=True)
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
            results: list[Outcome] = []
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
                failure = unavailable(error)
                results = [(item.future, None, failure) for item in items]
            except Exception as error:
                results = [(item.future, None, error) for item in items]
            loop.call_soon_threadsafe(settle_all, results)

    async def run_batched(self, work: Callable[[Session], T]) -> T:
        """Like run, but on SQLite writes that queue up while the database is busy share one
        transaction (each in its own SAVEPOINT, so one failing write does not undo the others).
        Bank answers arrive in bursts (16 per lookup); committing them together is what lets one
        SQLite writer keep up. Each write still checks its own lease and finalises its own lookup.
        """
        if not self.is_sqlite:
            # PostgreSQL has many writers already; a batch would hold row locks of many lookups at
            # once, in arbitrary order, and deadlock with another batch.
            return await self.run(work)
        return cast(T, await self._enqueue(BatchItem(work, savepoint=True, core=False)))

    async def _enqueue(self, item: BatchItem) -> Any:
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
        results: list[Outcome] = []
        try:
            if all(item.core for item in items):
                results = self._drain_core(items)
            else:
                with self.session() as session:
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
        except (OperationalError, sqlite3.OperationalError) as error:  # also BEGIN or COMMIT of _drain_core
            failure = unavailable(error)
            results = [(item.future, None, failure) for item in items]
        except Exception as error:  # the commit itself failed: nothing of this batch was written
            results = [(item.future, None, error) for item in items]
        loop.call_soon_threadsafe(settle_all, results)  # one wake-up of the loop for the batch

    def _drain_core(self, items: list[BatchItem]) -> list[Outcome]:
        """A batch of Core work on SQLite, in one transaction that this thread's own connection
        begins, savepoints and commits itself, without an ORM Session's begin/savepoint/commit
        bookkeeping. The hot statements run through Prepared, which never begins a SQLAlchemy
        transaction on this connection: BEGIN would fail inside ours."""
        if self._core_connection is None:
            self._core_connection = self.engine.connect()
        c = self._core_connection
        raw = driver_connection(c)
        results: list[Outcome] = []
        raw.execute("BEGIN IMMEDIATE")
        try:
            for item in items:
                try:
                    if not item.savepoint:
                        results.append((item.future, item.work(c), None))
                        continue
                    with savepoint(c):
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

    # -- the database as a whole ---------------------------------------------------

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
            await self.run(lambda s: s.execute(select(1)).scalar())
        except StoreUnavailable:
            return False
        return True


_savepoint_names = itertools.count()


@contextlib.contextmanager
def savepoint(c: Connection) -> Iterator[None]:
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


def settle_all(results: list[Outcome]) -> None:
    for future, value, failure in results:
        settle(future, value, failure)


def settle(future: asyncio.Future[Any], value: Any, failure: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if failure is None:
        future.set_result(value)
    else:
        future.set_exception(failure)
