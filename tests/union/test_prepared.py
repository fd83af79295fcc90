"""The SQLite fast path for hot statements (server/union/storage/prepared.py) stores and reads
exactly what SQLAlchemy's own execution stores and reads: the same bytes in every column, the
same Python values back, the same exceptions."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, exc
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.pool import NullPool

from server.union.domain import model
from server.union.storage.models import UtcDateTime
from server.union.storage.prepared import _utc_text
from server.union.storage.store import _BatchItem, _Hot, open_store

NOW = datetime(2026, 11, 27, 9, 45, 49, 123456, tzinfo=UTC)
# Not UTC, and on a whole second: both must be stored as SQLAlchemy stores them.
ELSEWHERE = datetime(2026, 11, 28, 1, 0, 0, tzinfo=timezone(timedelta(hours=8)))


def _migrated(path: Path) -> Engine:
    store = open_store(f"sqlite:///{path}")
    store.migrate()
    store.engine.dispose()
    return create_engine(f"sqlite:///{path}", poolclass=NullPool)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    fast, core = _migrated(tmp_path / "fast.db"), _migrated(tmp_path / "core.db")
    yield fast, core
    fast.dispose()
    core.dispose()


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

    one(_Hot.insert_lookup, _lookup("l1"))
    one(_Hot.insert_lookup, _lookup("l2", state=model.LookupState.COMPLETED, complete_time=ELSEWHERE))
    many(_Hot.insert_tasks, [_task("l1", "ICBC", 0), _task("l1", "ABC", 1), _task("l2", "BOC", 0)])
    many(
        _Hot.record_answer,
        [
            {
                "k_lookup_id": "l1",
                "k_bank_code": "ICBC",
                "v_card_count": 2,
                "v_debit_count": 1,
                "v_credit_count": 1,
                "v_latency_ms": 12,
                "v_update_time": ELSEWHERE,
            }
        ],
    )
    many(
        _Hot.insert_cards,
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
            }
            for i in range(3)
        ],
    )
    many(_Hot.complete_lookup, [{"k_id": "l1", "v_time": NOW, "v_report_id": "r1"}])
    many(
        _Hot.insert_reports,
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
        _Hot.insert_notifications,
        [{"lookup_id": "l1", "report_id": "r1", "sealed_contact": "contact", "create_time": NOW}],
    )
    one(_Hot.bump, {"k_name": "reports_generated", "v_by": 3})
    one(
        _Hot.insert_audit,
        {
            "time": ELSEWHERE,
            "actor": "a" * 64,
            "action": "lookup.create",
            "outcome": "OK",
            "resource": "lookups/l1",
        },
    )


def _dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as raw:
        tables = [name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            # Table names from sqlite_master, not input.
            table: sorted(raw.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)  # noqa: S608
            for table in tables
        }


def test_fast_writes_store_what_sqlalchemy_stores(engines: tuple[Engine, Engine], tmp_path: Path) -> None:
    fast, core = engines
    for engine, is_fast in ((fast, True), (core, False)):
        with engine.begin() as c:
            _write(c, is_fast)
    assert _dump(tmp_path / "fast.db") == _dump(tmp_path / "core.db")
    # And the stored datetimes are SQLAlchemy's naive-UTC text, microseconds included.
    with sqlite3.connect(tmp_path / "fast.db") as raw:
        assert raw.execute("SELECT create_time, deadline_time FROM lookups WHERE id = 'l1'").fetchone() == (
            "2026-11-27 09:45:49.123456",
            "2026-11-27 17:00:00.000000",
        )


def test_fast_reads_return_what_sqlalchemy_returns(engines: tuple[Engine, Engine]) -> None:
    fast, _ = engines
    with fast.begin() as c:
        _write(c, True)
    reads: list[tuple[Any, dict[str, Any]]] = [
        (_Hot.lookup_with_progress, {"lookup_id": "l1"}),
        (_Hot.lookup_with_progress, {"lookup_id": "missing"}),
        (_Hot.person_activity, {"person_hash": "p" * 64, "request_id": "req-l2"}),
        (_Hot.pending_of_lookups, {"lookup_ids": ["l1", "l2"]}),
        (_Hot.running_of_lookups, {"lookup_ids": ["l1", "l2", "l3"]}),
    ]
    with fast.connect() as c:
        for prepared, params in reads:
            expected = c.execute(prepared.statement, params).all()
            got = prepared.run(c, params)
            assert [tuple(row) for row in got] == [tuple(row) for row in expected]
            for row, want in zip(got, expected, strict=True):
                assert row._asdict() == want._asdict()  # the same names for attribute access
    with fast.connect() as c:
        [row] = _Hot.person_activity.run(c, {"person_hash": "p" * 64, "request_id": "req-l2"})
        assert row.existing_id == "l2"
        assert row.last_complete == ELSEWHERE
        assert row.last_complete.tzinfo is not None  # aware UTC, as the column type reads it
        first = _Hot.lookup_with_progress.run(c, {"lookup_id": "l1"})[0]
        assert first.create_time == NOW
        assert first.state == model.LookupState.COMPLETED


def test_fast_path_raises_sqlalchemy_errors(engines: tuple[Engine, Engine]) -> None:
    fast, _ = engines
    with fast.begin() as c:
        _Hot.insert_lookup.run(c, _lookup("l1"))
    with pytest.raises(exc.IntegrityError), fast.begin() as c:
        _Hot.insert_lookup.run(c, _lookup("l1"))  # the same id again
    with pytest.raises(exc.IntegrityError), fast.begin() as c:
        _Hot.insert_lookup.run(c, _lookup("l9", request_id="req-l1"))  # person + request_id is unique


def test_an_insert_must_name_every_column(engines: tuple[Engine, Engine]) -> None:
    fast, _ = engines
    entry = {"time": NOW, "actor": "a" * 64, "action": "lookup.create", "outcome": "OK"}  # no resource
    with pytest.raises(ValueError, match="resource"), fast.begin() as c:
        _Hot.insert_audit.run(c, entry)


async def test_a_core_batch_keeps_one_failed_write_in_its_savepoint(tmp_path: Path) -> None:
    """_drain_core's own transaction: the failed write is undone, the others are committed."""
    store = open_store(f"sqlite:///{tmp_path / 'union.db'}")
    store.migrate()

    def insert(lookup_id: str, fail: bool = False) -> Any:
        def work(c: Connection) -> str:
            _Hot.insert_lookup.run(c, _lookup(lookup_id))
            if fail:
                raise ValueError("this write fails after its insert")
            return lookup_id

        return work

    def read(c: Connection) -> list[str]:
        return [row.id for row in _Hot.running_of_lookups.run(c, {"lookup_ids": ["l1", "l2", "l3"]})]

    try:
        items = [
            _BatchItem(insert("l1"), savepoint=True, core=True),
            _BatchItem(insert("l2", fail=True), savepoint=True, core=True),
            _BatchItem(insert("l3"), savepoint=True, core=True),
            _BatchItem(read, savepoint=False, core=True),
        ]
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(store._executor, store._drain_core, items)
        assert [value for _, value, _ in results] == ["l1", None, "l3", ["l1", "l3"]]
        assert isinstance(results[1][2], ValueError)
        with sqlite3.connect(tmp_path / "union.db") as raw:
            assert sorted(row[0] for row in raw.execute("SELECT id FROM lookups")) == ["l1", "l3"]
        # The next batch runs on the same connection, in a new transaction.
        again = await loop.run_in_executor(
            store._executor, store._drain_core, [_BatchItem(read, False, True)]
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
