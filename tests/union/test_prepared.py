"""The fast path for hot statements (server/union/storage/prepared.py) stores and reads exactly
what SQLAlchemy's own execution stores and reads, on SQLite and on PostgreSQL: the same values in
every column as the driver reads them back, the same Python values back, the same exceptions."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, delete, exc, func, insert, select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.pool import NullPool

from server.union.domain import model
from server.union.storage.answer_store import (
    COMPLETE_LOOKUP,
    PENDING_OF_LOOKUPS,
    RECORD_ANSWER,
    RUNNING_OF_LOOKUPS,
)
from server.union.storage.audit_store import INSERT_AUDIT
from server.union.storage.database import open_store
from server.union.storage.lookup_store import (
    INSERT_LOOKUP,
    INSERT_TASKS,
    LOOKUP_WITH_PROGRESS,
    PERSON_ACTIVITY,
)
from server.union.storage.models import Base, UtcDateTime
from server.union.storage.outbox_store import INSERT_NOTIFICATIONS
from server.union.storage.prepared import _utc_text, send_arrays_in_binary
from server.union.storage.report_store import CARDS, INSERT_CARDS, INSERT_REPORTS
from server.union.storage.runner import BatchItem
from server.union.storage.stats_store import BUMP, COUNTERS, COUNTERS_TABLE

NOW = datetime(2026, 11, 27, 9, 45, 49, 123456, tzinfo=UTC)
# Not UTC, and on a whole second: both must be stored as SQLAlchemy stores them.
ELSEWHERE = datetime(2026, 11, 28, 1, 0, 0, tzinfo=timezone(timedelta(hours=8)))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated union database on each backend."""
    store = open_store(database_url)
    store.migrate()
    store.engine.dispose()
    migrated = create_engine(database_url, poolclass=NullPool)
    send_arrays_in_binary(migrated)  # as the store's own engine does
    yield migrated
    migrated.dispose()


def _lookup(lookup_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "id": lookup_id,
        "person_hash": "p" * 64,
        "request_id": f"req-{lookup_id}",
        "region_code": "110000",
        "state": model.LookupState.RUNNING,
        "create_time": NOW,
        "deadline_time": ELSEWHERE,
        "complete_time": None,
        "sealed_identity": "sealed",
        "report_id": None,
        "sealed_contact": "contact",
        **changes,
    }


def _task(lookup_id: str, bank_code: str, position: int) -> dict[str, Any]:
    return {
        "lookup_id": lookup_id,
        "bank_code": bank_code,
        "position": position,
        "bank_name": f"银行 {bank_code}",
        "outcome": model.BankOutcome.PENDING,
        "attempt_count": 1,
        "next_attempt_time": NOW,
        "lease_owner": "union-1",
        "lease_until": NOW + timedelta(seconds=15),
        "card_count": 0,
        "debit_count": 0,
        "credit_count": 0,
        "failure_reason": "",
        "latency_ms": None,
        "update_time": NOW,
    }


def _write(c: Connection, fast: bool) -> None:
    """The hot writes of one lookup's life, through the fast path or through SQLAlchemy."""

    def one(prepared: Any, params: dict[str, Any]) -> None:
        if fast:
            prepared.run(c, params)
        else:
            c.execute(prepared.statement, params)

    def many(prepared: Any, rows: list[dict[str, Any]]) -> None:
        if fast:
            prepared.run_many(c, rows)
        else:
            c.execute(prepared.statement, rows)

    c.execute(delete(COUNTERS_TABLE))  # the migrations seed some; start both paths from none
    c.execute(insert(COUNTERS_TABLE), [{"name": name, "value": 0} for name in COUNTERS])
    one(INSERT_LOOKUP, _lookup("l1"))
    one(INSERT_LOOKUP, _lookup("l2", state=model.LookupState.COMPLETED, complete_time=ELSEWHERE))
    many(INSERT_TASKS, [_task("l1", "ICBC", 0), _task("l1", "ABC", 1), _task("l2", "BOC", 0)])
    many(
        RECORD_ANSWER,
        [
            {
                "k_lookup_id": "l1",
                "k_bank_code": bank_code,
                "v_card_count": cards,
                "v_debit_count": 1,
                "v_credit_count": cards - 1,
                "v_latency_ms": latency_ms,
                "v_update_time": ELSEWHERE,
            }
            for bank_code, cards, latency_ms in (("ICBC", 2, 12), ("ABC", 1, None))
        ],
    )
    many(
        INSERT_CARDS,
        [
            {
                "lookup_id": "l1",
                "card_ref": f"c{i}",
                "bank_code": "ICBC",
                "position": 0,
                "bank_card_ref": f"cr_{i}",
                "card_type": model.CardType.DEBIT,
                "first_four": "6222",
                "last_four": f"{i:04d}",
                "number_length": 19,
                "status": model.CardStatus.ACTIVE,
                "open_time": ELSEWHERE if i else None,  # a bank may not say
            }
            for i in range(3)
        ],
    )
    many(COMPLETE_LOOKUP, [{"k_id": "l1", "v_complete_time": NOW, "v_report_id": "r1"}])
    many(
        INSERT_REPORTS,
        [
            {
                "id": "r1",
                "lookup_id": "l1",
                "person_hash": "p" * 64,
                "generate_time": NOW,
                "expire_time": ELSEWHERE,
            }
        ],
    )
    many(
        INSERT_NOTIFICATIONS,
        [{"lookup_id": "l1", "report_id": "r1", "sealed_contact": "contact", "create_time": NOW}],
    )
    one(BUMP, {"k_name": "reports_generated", "v_by": 3})
    # The same row twice: each change applies, as executemany applies them (on PostgreSQL the
    # one-statement UPDATE of many rows would apply one, so it is not used for these).
    many(
        BUMP,
        [
            {"k_name": "lookups_created", "v_by": 1},
            {"k_name": "lookups_created", "v_by": 2},
            {"k_name": "reports_generated", "v_by": 5},
        ],
    )
    # A keyed update naming the same row twice: each applies in turn, as executemany does (the
    # PostgreSQL many-row form would apply one of them, so it is not used for these).
    many(
        RECORD_ANSWER,
        [
            {
                "k_lookup_id": "l2",
                "k_bank_code": "BOC",
                "v_card_count": cards,
                "v_debit_count": cards,
                "v_credit_count": 0,
                "v_latency_ms": 5,
                "v_update_time": NOW,
            }
            for cards in (4, 7)
        ],
    )
    one(
        INSERT_AUDIT,
        {
            "time": ELSEWHERE,
            "actor": "a" * 64,
            "action": "lookup.create",
            "outcome": "OK",
            "resource": "lookups/l1",
        },
    )


def _dump(c: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows as the driver itself reads them (SQLite's stored text, PostgreSQL's
    values), bypassing the column types. Not the numbers the database assigns itself: a
    PostgreSQL sequence is not rolled back with the transaction that used it."""
    dump = {}
    for table in Base.metadata.sorted_tables:
        columns = ", ".join(
            f'"{column.name}"' for column in table.columns if column is not table.autoincrement_column
        )
        # Names from the models, not input.
        rows = c.exec_driver_sql(f'SELECT {columns} FROM "{table.name}"').fetchall()  # noqa: S608
        dump[table.name] = sorted((tuple(row) for row in rows), key=repr)
    return dump


def _written(engine: Engine, fast: bool) -> dict[str, list[tuple[Any, ...]]]:
    """What one lookup's hot writes leave in the database (rolled back after reading)."""
    with engine.connect() as c, c.begin() as transaction:
        _write(c, fast)
        written = _dump(c)
        transaction.rollback()
    return written


def test_fast_writes_store_what_sqlalchemy_stores(engine: Engine) -> None:
    fast = _written(engine, fast=True)
    assert fast == _written(engine, fast=False)
    assert sorted(fast["counters"]) == [
        ("lookups_created", 3),
        ("people_verified", 0),
        ("reports_generated", 8),
    ]
    answered = {row[1]: row for row in fast["bank_tasks"] if row[0] == "l1"}
    assert answered["ICBC"][4] == answered["ABC"][4] == "answered"
    [lookup] = [row for row in fast["lookups"] if row[0] == "l1"]
    if engine.dialect.name == "sqlite":
        # SQLAlchemy's naive-UTC text, microseconds included.
        assert "2026-11-27 09:45:49.123456" in lookup
        assert "2026-11-27 17:00:00.000000" in lookup
    else:
        assert NOW in lookup  # timestamptz: the same instant
        assert ELSEWHERE in lookup


def test_many_rows_go_in_one_statement_on_postgresql(engine: Engine) -> None:
    """The many-row forms written out for PostgreSQL (one array per column) are the ones used for
    inserts and keyed updates; SQLite runs the single statement for each row."""
    rows = [_task("l1", "ICBC", 0), _task("l1", "ABC", 1)]
    answers = [{"k_lookup_id": "l1", "k_bank_code": "ICBC", "v_card_count": 1, "v_debit_count": 1,
                "v_credit_count": 0, "v_latency_ms": 3, "v_update_time": NOW}]  # fmt: skip
    with engine.connect() as c:
        forms = [INSERT_TASKS._for(c, rows[0]).many, RECORD_ANSWER._for(c, answers[0]).many]
    if engine.dialect.name == "sqlite":
        assert forms == [None, None]
    else:
        assert all(form is not None and "unnest(" in form.sql for form in forms)


def test_many_rows_arrive_once_each(engine: Engine) -> None:
    """On PostgreSQL many rows go as one array per column: more values than one statement may
    carry as parameters (65,535) still arrive, each row once."""
    cards = [
        {
            "lookup_id": "l1",
            "card_ref": f"c{i}",
            "bank_code": "ICBC",
            "position": 0,
            "bank_card_ref": f"cr_{i}",
            "card_type": model.CardType.CREDIT,
            "first_four": "6222",
            "last_four": f"{i % 10000:04d}",
            "number_length": 16,
            "status": model.CardStatus.ACTIVE,
        }
        for i in range(7000)  # 70,000 parameters at 10 columns a row
    ]
    with engine.connect() as c, c.begin() as transaction:
        INSERT_LOOKUP.run(c, _lookup("l1"))
        INSERT_CARDS.run_many(c, cards)
        refs = c.execute(select(CARDS.c.card_ref)).scalars().all()
        assert sorted(refs) == sorted(str(card["card_ref"]) for card in cards)
        assert c.execute(select(func.count()).select_from(CARDS)).scalar() == 7000
        transaction.rollback()


def test_fast_reads_return_what_sqlalchemy_returns(engine: Engine) -> None:
    fast = engine
    with fast.begin() as c:
        _write(c, True)
    reads: list[tuple[Any, dict[str, Any]]] = [
        (LOOKUP_WITH_PROGRESS, {"lookup_id": "l1"}),
        (LOOKUP_WITH_PROGRESS, {"lookup_id": "missing"}),
        (PERSON_ACTIVITY, {"person_hash": "p" * 64, "request_id": "req-l2"}),
        (PENDING_OF_LOOKUPS, {"lookup_ids": ["l1", "l2"]}),
        (RUNNING_OF_LOOKUPS, {"lookup_ids": ["l1", "l2", "l3"]}),
    ]
    with fast.connect() as c:
        for prepared, params in reads:
            expected = c.execute(prepared.statement, params).all()
            got = prepared.run(c, params)
            assert [tuple(row) for row in got] == [tuple(row) for row in expected]
            for row, want in zip(got, expected, strict=True):
                assert row._asdict() == want._asdict()  # the same names for attribute access
    with fast.connect() as c:
        [row] = PERSON_ACTIVITY.run(c, {"person_hash": "p" * 64, "request_id": "req-l2"})
        assert row.existing_id == "l2"
        first = LOOKUP_WITH_PROGRESS.run(c, {"lookup_id": "l1"})[0]
        assert first.create_time == NOW
        assert first.create_time.tzinfo is not None  # aware UTC, as the column type reads it
        assert first.state == model.LookupState.COMPLETED


def test_fast_path_raises_sqlalchemy_errors(engine: Engine) -> None:
    fast = engine
    with fast.begin() as c:
        INSERT_LOOKUP.run(c, _lookup("l1"))
    with pytest.raises(exc.IntegrityError), fast.begin() as c:
        INSERT_LOOKUP.run(c, _lookup("l1"))  # the same id again
    with pytest.raises(exc.IntegrityError), fast.begin() as c:
        INSERT_LOOKUP.run(c, _lookup("l9", request_id="req-l1"))  # person + request_id is unique


def test_an_insert_must_name_every_column(engine: Engine) -> None:
    fast = engine
    entry = {"time": NOW, "actor": "a" * 64, "action": "lookup.create", "outcome": "OK"}  # no resource
    with pytest.raises(ValueError, match="resource"), fast.begin() as c:
        INSERT_AUDIT.run(c, entry)


async def test_a_core_batch_keeps_one_failed_write_in_its_savepoint(tmp_path: Path) -> None:
    """_drain_core's own transaction: the failed write is undone, the others are committed."""
    store = open_store(f"sqlite:///{tmp_path / 'union.db'}")
    store.migrate()

    def insert(lookup_id: str, fail: bool = False) -> Any:
        def work(c: Connection) -> str:
            INSERT_LOOKUP.run(c, _lookup(lookup_id))
            if fail:
                raise ValueError("this write fails after its insert")
            return lookup_id

        return work

    def read(c: Connection) -> list[str]:
        return [row.id for row in RUNNING_OF_LOOKUPS.run(c, {"lookup_ids": ["l1", "l2", "l3"]})]

    try:
        items = [
            BatchItem(insert("l1"), savepoint=True, core=True),
            BatchItem(insert("l2", fail=True), savepoint=True, core=True),
            BatchItem(insert("l3"), savepoint=True, core=True),
            BatchItem(read, savepoint=False, core=True),
        ]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(store.runner._executor, store.runner._drain_core, items)
        assert [value for _, value, _ in results] == ["l1", None, "l3", ["l1", "l3"]]
        assert isinstance(results[1][2], ValueError)
        with sqlite3.connect(tmp_path / "union.db") as raw:
            assert sorted(row[0] for row in raw.execute("SELECT id FROM lookups")) == ["l1", "l3"]
        # The next batch runs on the same connection, in a new transaction.
        again = await loop.run_in_executor(
            store.runner._executor, store.runner._drain_core, [BatchItem(read, False, True)]
        )
        assert again[0][1] == ["l1", "l3"]
    finally:
        await store.close()


def test_utc_datetimes_bind_to_sqlalchemys_text() -> None:
    """The one-step UtcDateTime conversion against SQLAlchemy's two processors, across the cases
    that tell formats apart: zero microseconds, other time zones, day and year boundaries."""
    dialect = sqlite_dialect.dialect()
    column_type = UtcDateTime()
    processor = column_type.dialect_impl(dialect).bind_processor(dialect)  # both of them, chained
    assert processor is not None
    for value in [
        NOW,
        ELSEWHERE,
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2027, 1, 1, 7, 30, tzinfo=timezone(timedelta(hours=8))),  # the year before, in UTC
        datetime(1999, 3, 1, 0, 0, 0, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        datetime(2026, 11, 27, tzinfo=UTC),
    ]:
        assert _utc_text(value) == processor(value)
    assert _utc_text(None) is None
    with pytest.raises(ValueError, match="naive"):
        _utc_text(datetime(2026, 11, 27, 12, 0))  # as the column type refuses it


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_queued_postgresql_reads_share_a_transaction(database_url: str) -> None:
    """_drain_reads: reads that queued up run in one transaction; one that fails is answered with
    its error, and the reads after it run in a new transaction."""
    store = open_store(database_url)
    store.migrate()

    def transaction_id(c: Connection) -> int:
        return int(c.exec_driver_sql("SELECT txid_current()").scalar_one())

    def failing(c: Connection) -> None:
        c.exec_driver_sql("SELECT * FROM no_such_table")

    try:
        items = [BatchItem(work, savepoint=False, core=True) for work in (transaction_id,) * 2]
        items.append(BatchItem(failing, savepoint=False, core=True))
        items += [BatchItem(transaction_id, savepoint=False, core=True) for _ in range(2)]
        store.runner._reads, store.runner._reads_draining = list(items), True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(store.runner._executor, store.runner._drain_reads, loop)
        await asyncio.sleep(0)  # the results are settled by a callback on this loop
        first, second, _, third, fourth = (item.future for item in items)
        assert first.result() == second.result()
        with pytest.raises(exc.ProgrammingError):
            items[2].future.result()
        assert third.result() == fourth.result() != first.result()
        assert not store.runner._reads_draining  # the next read starts a drain of its own
        assert await store.find_lookup_by_request("p" * 64, "req-none", "fingerprint") is None
    finally:
        await store.close()
