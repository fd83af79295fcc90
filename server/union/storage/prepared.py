"""Hot statements that skip SQLAlchemy's per-execution work on SQLite.

A `Prepared` wraps one Core statement. On PostgreSQL it is simply executed by
SQLAlchemy. On SQLite it is compiled once (per set of inserted columns) and
run on the connection's own sqlite3 handle, inside whatever transaction is open
there (SQLAlchemy's, or the raw one of `Store._drain_core`): the values still
go through every column type's own bind
processor, and rows through the result processors, so what is stored and read
is exactly what SQLAlchemy would store and read (tests/union/test_prepared.py
compares the two). What is skipped is the execution context, cache-key and
result machinery: py-spy put it at about half of the union's database thread
(0.5 ms per statement on the 2-core VM, against 0.03 ms in sqlite3 itself).

Failures are raised as SQLAlchemy's own exceptions (IntegrityError,
OperationalError, ...), so callers handle both backends alike.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Insert, Select, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter

from server.union.storage.models import UtcDateTime

Params = Mapping[str, Any]
_Processor = Callable[[Any], Any] | None

_ERRORS: tuple[tuple[type[sqlite3.Error], type[exc.DBAPIError]], ...] = (
    (sqlite3.IntegrityError, exc.IntegrityError),
    (sqlite3.OperationalError, exc.OperationalError),
    (sqlite3.DatabaseError, exc.DatabaseError),
)


def _utc_text(value: datetime | None) -> str | None:
    """UtcDateTime's bind processing on SQLite, in one step: the same text SQLAlchemy stores
    ("YYYY-MM-DD HH:MM:SS.ffffff", UTC) from datetime's own C formatting, in 60% of the time of
    its two processors (a lookup binds over a hundred datetimes)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _bind_processor(bind: BindParameter[Any], dialect: Dialect) -> _Processor:
    if isinstance(bind.type, UtcDateTime):
        return _utc_text
    return bind.type.dialect_impl(dialect).bind_processor(dialect)


class _Compiled:
    """One SQLite rendering: SQL text, its positional parameters and how to convert them."""

    def __init__(self, statement: Executable, dialect: Dialect, keys: Sequence[str] | None) -> None:
        compiled = cast(ClauseElement, statement).compile(
            dialect=dialect, column_keys=list(keys) if keys is not None else None
        )
        assert isinstance(compiled, SQLCompiler)
        names = list(compiled.positiontup or [])
        self.sql = compiled.string
        # A parameter with expanding=True (IN lists) renders as a placeholder to fill per call.
        self.expanding: str | None = None
        binds: dict[str, BindParameter[Any]] = compiled.binds
        for name in names:
            if binds[name].expanding:
                if self.expanding is not None:
                    raise ValueError("one expanding parameter per prepared statement")
                self.expanding = name
        if keys is not None and not set(names) <= set(keys):
            # A column left to its Python-side default would need SQLAlchemy's execution context.
            raise ValueError(f"give every column of the INSERT: {sorted(set(names) - set(keys))} missing")
        self.names = names
        self.processors: list[_Processor] = [_bind_processor(binds[name], dialect) for name in names]
        # Values fixed in the statement itself (e.g. .values(outcome="answered")).
        self.fixed = {name: binds[name].effective_value for name in names if not binds[name].required}
        self.returns_rows = isinstance(statement, Select)
        self.row: Any = None  # a namedtuple named after the rendered labels, made on first use
        self.results: list[_Processor] = []
        if isinstance(statement, Select):
            columns = statement.selected_columns
            self.results = [
                column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
            ]

    def positional(self, params: Params) -> tuple[str, list[Any]]:
        sql = self.sql
        values: list[Any] = []
        for name, processor in zip(self.names, self.processors, strict=True):
            value = params[name] if name in params else self.fixed[name]
            if name == self.expanding:
                items = list(value or ())
                if not items:
                    raise ValueError(f"empty IN list for {name}")
                sql = sql.replace(f"__[POSTCOMPILE_{name}]", ",".join("?" * len(items)))
                values.extend(processor(item) if processor else item for item in items)
                continue
            values.append(processor(value) if processor else value)
        return sql, values

    def positional_many(self, rows: Sequence[Params]) -> list[list[Any]]:
        """Every row's values, each distinct value converted once per column (a lookup's sixteen
        task rows share their timestamps, which were a sixth of creating it)."""
        if self.expanding is not None:
            raise ValueError("executemany with an expanding parameter")
        columns: list[tuple[str, _Processor, dict[Any, Any] | None]] = [
            (name, processor, {} if processor else None)
            for name, processor in zip(self.names, self.processors, strict=True)
        ]
        fixed = self.fixed
        converted: list[list[Any]] = []
        for params in rows:
            values: list[Any] = []
            for name, processor, seen in columns:
                value = params[name] if name in params else fixed[name]
                if processor is None or seen is None:
                    values.append(value)
                    continue
                try:
                    values.append(seen[value])
                except (KeyError, TypeError):  # new, or unhashable (then converted every time)
                    result = processor(value)
                    with contextlib.suppress(TypeError):
                        seen[value] = result
                    values.append(result)
            converted.append(values)
        return converted

    def rows(self, cursor: sqlite3.Cursor) -> list[Any]:
        if self.row is None:
            # The labels SQLAlchemy's rows are keyed by ("max_1" for an unnamed max(), ...).
            labels = [column[0] for column in cursor.description]
            self.row = namedtuple("Row", labels, rename=True)  # type: ignore[misc]
        make = self.row._make
        # Only the columns that have a processor are touched, and each distinct value once: a
        # lookup read joins its sixteen banks to the lookup's row, whose two datetimes were parsed
        # on every row (a generator over every cell was most of the rest).
        converting: list[tuple[int, Callable[[Any], Any], dict[Any, Any]]] = [
            (index, processor, {}) for index, processor in enumerate(self.results) if processor
        ]
        if not converting:
            return [make(raw) for raw in cursor.fetchall()]
        rows = []
        for raw in cursor.fetchall():
            values = list(raw)
            for index, processor, seen in converting:
                value = values[index]
                if value in seen:
                    values[index] = seen[value]
                else:
                    values[index] = seen[value] = processor(value)
            rows.append(make(values))
        return rows


class Prepared:
    """A hot statement. `run(c, params)` executes it once and returns the rows of a SELECT
    (attribute access by column name, like SQLAlchemy's rows; [] for other statements);
    `run_many(c, rows)` executes it for each parameter set (executemany)."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, ...] | None, _Compiled] = {}

    def _for(self, c: Connection, params: Params) -> _Compiled:
        # An INSERT renders the columns it is given; every other statement renders once.
        keys = tuple(params) if isinstance(self.statement, Insert) else None
        compiled = self._compiled.get(keys)
        if compiled is None:
            compiled = self._compiled[keys] = _Compiled(self.statement, c.dialect, keys)
        return compiled

    def run(self, c: Connection, params: Params) -> list[Any]:
        if c.dialect.name != "sqlite":
            result = c.execute(self.statement, dict(params))
            return list(result.all()) if result.returns_rows else []
        compiled = self._for(c, params)
        sql, values = compiled.positional(params)
        with _as_sqlalchemy_errors(sql, params):
            executed = driver_connection(c).execute(sql, values)
            return compiled.rows(executed) if compiled.returns_rows else []

    def run_many(self, c: Connection, rows: Sequence[Params]) -> None:
        if not rows:
            return
        if c.dialect.name != "sqlite":
            c.execute(self.statement, [dict(row) for row in rows])
            return
        compiled = self._for(c, rows[0])
        values = compiled.positional_many(rows)
        with _as_sqlalchemy_errors(compiled.sql, rows):
            driver_connection(c).executemany(compiled.sql, values)


def driver_connection(c: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under SQLAlchemy's (statements on it join its open transaction)."""
    driver = c.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


@contextlib.contextmanager
def _as_sqlalchemy_errors(sql: str, params: Any) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as error:
        for driver_error, wrapped in _ERRORS:
            if isinstance(error, driver_error):
                raise wrapped(sql, params, error) from error
        raise
