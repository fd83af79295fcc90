"""Hot statements that skip SQLAlchemy's per-execution work, on SQLite and PostgreSQL.

A `Prepared` wraps one Core statement. It is compiled once (per set of
inserted columns) and run on the driver's own connection (sqlite3 or psycopg),
inside whatever transaction is open there (SQLAlchemy's, or on SQLite the raw
one of `Store._drain_core`): the values still go through every column type's
own bind processor, and rows through the result processors, so what is stored
and read is exactly what SQLAlchemy would store and read
(tests/union/test_prepared.py compares the two on both backends). What is
skipped is the execution context, cache-key and result machinery: py-spy put
it at about half of the union's database thread on SQLite (0.5 ms per
statement on the 2-core VM, against 0.03 ms in sqlite3 itself), and at a
third of the database threads' time on PostgreSQL.

On PostgreSQL the statement is compiled in psycopg's positional paramstyle
(`%s`), so both drivers fill placeholders from one list. Many rows go in one
statement over one binary array per parameter: an INSERT as
`INSERT ... SELECT * FROM unnest(...)`, an UPDATE whose WHERE is equalities as
`UPDATE ... FROM unnest(...)` (where no two rows pick the same row). psycopg's
executemany is one execution per row in a pipeline, and a multi-row VALUES is
new SQL text for every row count (parsed again by psycopg, never prepared by
the server); these are one text each, prepared once.

Failures are raised as SQLAlchemy's own exceptions (IntegrityError,
OperationalError, ...), so callers handle both backends alike.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sqlite3
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
from sqlalchemy import Connection, Insert, Select, Update, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter

from server.union.storage.models import UtcDateTime

Params = Mapping[str, Any]
_Processor = Callable[[Any], Any] | None

_ERRORS: tuple[tuple[type[Exception], type[exc.DBAPIError]], ...] = (
    (sqlite3.IntegrityError, exc.IntegrityError),
    (sqlite3.OperationalError, exc.OperationalError),
    (sqlite3.DatabaseError, exc.DatabaseError),
    (psycopg.IntegrityError, exc.IntegrityError),
    (psycopg.OperationalError, exc.OperationalError),
    (psycopg.DatabaseError, exc.DatabaseError),
)
_DRIVER_ERRORS = (sqlite3.Error, psycopg.Error)


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
    if dialect.name == "sqlite" and isinstance(bind.type, UtcDateTime):
        return _utc_text
    return bind.type.dialect_impl(dialect).bind_processor(dialect)


def _positional(dialect: Dialect) -> Dialect:
    """The dialect to compile with: SQLite's qmark is positional already; psycopg's pyformat
    (`%(name)s`) becomes its format paramstyle (`%s`), which the same driver takes."""
    if dialect.positional:
        return dialect
    positional = copy.copy(dialect)
    positional.paramstyle = "format"
    positional.positional = True
    return positional


def _insert_arrays(statement: Executable, sql: str, parameters: int) -> str:
    """`INSERT INTO t (a, b) VALUES (%s::VARCHAR, %s::INTEGER)` as
    `INSERT INTO t (a, b) SELECT * FROM unnest(%b::VARCHAR[], %b::INTEGER[])`, or "" if the
    statement is not rendered so (every value cast, as SQLAlchemy's psycopg dialect renders it)."""
    if not isinstance(statement, Insert):
        return ""
    head, marker, row = sql.rpartition(" VALUES (")
    casts = row.removesuffix(")").split(", ")
    if not marker or not row.endswith(")") or len(casts) != parameters:
        return ""
    if not all(cast.startswith("%s::") and "%" not in cast[2:] for cast in casts):
        return ""
    # %b: arrays go in psycopg's binary format; in text, every element of every array was
    # quoted by regular expressions (1.0 against 0.4 ms of CPU for a lookup's 16 task rows).
    arrays = ", ".join("%b" + cast[2:] + "[]" for cast in casts)
    return f"{head} SELECT * FROM unnest({arrays})"  # noqa: S608 (SQLAlchemy's own rendering, no values)


# A cast placeholder as SQLAlchemy's psycopg dialect renders it: `%s::TIMESTAMP WITH TIME ZONE`,
# ending where the SET list, the WHERE clause or an expression goes on.
_CAST_PLACEHOLDER = re.compile(r"%s::([A-Z][A-Z ]*?)(?=, | WHERE | AND |\)|$)")
# A WHERE clause that picks rows by equalities only: then rows of the arrays with different values
# there can never pick the same row.
_EQUALITIES = re.compile(r"[\w.]+ = v\.p\d+( AND [\w.]+ = v\.p\d+)*")


def _update_arrays(statement: Executable, sql: str, parameters: int) -> tuple[str, list[int]]:
    """`UPDATE t SET a=%s::INTEGER WHERE t.k = %s::VARCHAR` as `UPDATE t SET a=v.p0 FROM
    unnest(%b::INTEGER[], %b::VARCHAR[]) AS v(p0, p1) WHERE t.k = v.p1`, and the positions of
    the WHERE clause's parameters; ("", []) if the statement is not rendered so or its WHERE is
    not equalities alone. It is executemany's equal only where no two rows share the WHERE's
    values (see Prepared.run_many)."""
    if not isinstance(statement, Update) or sql.count(" WHERE ") != 1 or " FROM " in sql:
        return "", []
    casts = _CAST_PLACEHOLDER.findall(sql)
    if len(casts) != parameters or sql.count("%") != parameters:
        return "", []
    numbered = iter(range(parameters))
    body = _CAST_PLACEHOLDER.sub(lambda _: f"v.p{next(numbered)}", sql)
    head, marker, where = body.partition(" WHERE ")
    if not _EQUALITIES.fullmatch(where):
        return "", []
    arrays = ", ".join(f"%b::{cast}[]" for cast in casts)
    columns = ", ".join(f"p{index}" for index in range(parameters))
    keys = [int(number) for number in re.findall(r"v\.p(\d+)", where)]
    update = f"{head} FROM unnest({arrays}) AS v({columns}){marker}{where}"
    return update, keys


class _Compiled:
    """One rendering: SQL text, its positional parameters and how to convert them."""

    def __init__(self, statement: Executable, dialect: Dialect, keys: Sequence[str] | None) -> None:
        compiled = cast(ClauseElement, statement).compile(
            dialect=_positional(dialect), column_keys=list(keys) if keys is not None else None
        )
        assert isinstance(compiled, SQLCompiler)
        names = list(compiled.positiontup or [])
        self.sql = compiled.string
        self.placeholder = "?" if dialect.paramstyle == "qmark" else "%s"
        # PostgreSQL: the INSERT of many rows, one array per column ("" where not rendered so).
        self.insert_arrays = ""
        # PostgreSQL: the UPDATE of many rows, likewise, and which parameters pick the row.
        self.update_arrays, self.update_keys = "", list[int]()
        if self.placeholder == "%s":
            self.insert_arrays = _insert_arrays(statement, self.sql, len(names))
            self.update_arrays, self.update_keys = _update_arrays(statement, self.sql, len(names))
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
                sql = sql.replace(f"__[POSTCOMPILE_{name}]", ",".join([self.placeholder] * len(items)))
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

    def rows(self, cursor: Any) -> list[Any]:
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
        self._compiled: dict[tuple[type[Dialect], tuple[str, ...] | None], _Compiled] = {}

    def _for(self, c: Connection, params: Params) -> _Compiled:
        # Once per dialect (statements are shared by every store in the process); an INSERT
        # renders the columns it is given, every other statement renders once.
        key = (type(c.dialect), tuple(params) if isinstance(self.statement, Insert) else None)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = _Compiled(self.statement, c.dialect, key[1])
        return compiled

    def run(self, c: Connection, params: Params) -> list[Any]:
        compiled = self._for(c, params)
        sql, values = compiled.positional(params)
        with _as_sqlalchemy_errors(sql, params):
            executed = _driver(c).execute(sql, values)
            return compiled.rows(executed) if compiled.returns_rows else []

    def run_many(self, c: Connection, rows: Sequence[Params]) -> None:
        if not rows:
            return
        compiled = self._for(c, rows[0])
        values = compiled.positional_many(rows)
        driver = _driver(c)
        with _as_sqlalchemy_errors(compiled.sql, rows):
            if isinstance(driver, sqlite3.Connection):
                driver.executemany(compiled.sql, values)
            elif compiled.insert_arrays:
                driver.execute(compiled.insert_arrays, [list(column) for column in zip(*values, strict=True)])
            elif compiled.update_arrays and _distinct(values, compiled.update_keys):
                driver.execute(compiled.update_arrays, [list(column) for column in zip(*values, strict=True)])
            else:
                with driver.cursor() as cursor:
                    cursor.executemany(compiled.sql, values)


def _distinct(rows: list[list[Any]], keys: list[int]) -> bool:
    """Whether no two rows have the same values at `keys`: then one UPDATE ... FROM their arrays
    changes each row once, as executemany would (with duplicates, PostgreSQL would apply only one
    of them, where executemany applies each in turn)."""
    seen = {tuple(row[index] for index in keys) for row in rows}
    return bool(keys) and len(seen) == len(rows)


def _driver(c: Connection) -> sqlite3.Connection | psycopg.Connection[Any]:
    """The driver's connection under SQLAlchemy's (statements on it join its open transaction)."""
    driver = c.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection | psycopg.Connection)
    return driver


def driver_connection(c: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under SQLAlchemy's, for the SQLite writer's raw transactions."""
    driver = _driver(c)
    assert isinstance(driver, sqlite3.Connection)
    return driver


@contextlib.contextmanager
def _as_sqlalchemy_errors(sql: str, params: Any) -> Iterator[None]:
    try:
        yield
    except _DRIVER_ERRORS as error:
        for driver_error, wrapped in _ERRORS:
            if isinstance(error, driver_error):
                raise wrapped(sql, params, error) from error
        raise
