"""Hot statements run on the driver's own connection, with SQLAlchemy's values and rows.

A `Prepared` wraps one Core statement. SQLAlchemy compiles it, once per
dialect (and per set of inserted columns, or per length of an IN list, which
SQLAlchemy expands with `construct_expanded_state`); the statement then runs on
the driver's connection (sqlite3 or psycopg) inside whatever transaction is
open there. Values still go through every column type's own bind processor and
rows through its result processor, so what is stored and read is exactly what
SQLAlchemy would store and read (tests/union/test_prepared.py compares the two
on both backends). What is skipped is SQLAlchemy's per-execution machinery
(execution context, cache key, result objects), which costs more than the
statement itself on SQLite.

Many rows at once (`run_many`): SQLite runs the statement with executemany. On
PostgreSQL psycopg's executemany is one execution per row, so the many-row
forms are their own statements, written out here in Core and compiled by
SQLAlchemy like any other: an INSERT is `INSERT ... SELECT ... FROM unnest(one
array per column)` (`unnest_insert`), and an UPDATE that picks its rows by
equalities is `UPDATE ... FROM unnest(...)` (`KeyedUpdate`). Nothing rewrites
compiled SQL text.

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

import psycopg
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Select,
    Table,
    bindparam,
    event,
    exc,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import TypeEngine

from server.union.storage.models import UtcDateTime

Params = Mapping[str, Any]
_MISSING: Any = object()  # a parameter the caller must give
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
    ("YYYY-MM-DD HH:MM:SS.ffffff", UTC) from datetime's own C formatting rather than its two
    chained processors (a lookup binds over a hundred datetimes)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _bind_processor(column_type: TypeEngine[Any], dialect: Dialect) -> _Processor:
    if dialect.name == "sqlite" and isinstance(column_type, UtcDateTime):
        return _utc_text
    return column_type.dialect_impl(dialect).bind_processor(dialect)


class _Form:
    """One rendering of a statement for a dialect: its SQL text and how to fill its parameters.

    Each parameter comes from the caller's value of `source` (one item of it, `index`, for an
    expanded IN list; an array of every row's value, `array`, for a many-row form), or from the
    statement itself (`fixed`), and is converted by its processor. SQLite's paramstyle is
    positional (a list, in `names` order), psycopg's is named (a dict)."""

    def __init__(
        self,
        sql: str,
        names: Sequence[str],
        binds: Mapping[str, BindParameter[Any]],
        dialect: Dialect,
        sources: Mapping[str, tuple[str, int | None]] | None = None,
        arrays: Mapping[str, TypeEngine[Any]] | None = None,
    ) -> None:
        self.sql = sql
        self.names = list(names)
        self.positional = dialect.positional
        # name → (the caller's key, index into its list or None)
        self.sources = {name: (sources or {}).get(name, (name, None)) for name in self.names}
        arrays = arrays or {}
        self.arrays = {name for name in self.names if name in arrays}
        self.processors: list[_Processor] = [
            _bind_processor(arrays[name] if name in arrays else binds[name].type, dialect)
            for name in self.names
        ]
        # Values fixed in the statement itself (e.g. .values(outcome="answered")).
        self.fixed = {
            name: binds[name].effective_value
            for name in self.names
            if name in binds and not binds[name].required and name not in self.arrays
        }
        # Per parameter, in order: where its value comes from, and its converter.
        self._plan = [
            (*self.sources[name], processor, self.fixed.get(name, _MISSING))
            for name, processor in zip(self.names, self.processors, strict=True)
        ]

    def values(self, params: Params) -> list[Any] | dict[str, Any]:
        values: list[Any] = []
        append = values.append
        for source, index, processor, default in self._plan:
            value = params.get(source, default)
            if value is _MISSING:
                raise KeyError(source)
            if index is not None:
                value = value[index]
            append(processor(value) if processor else value)
        return values if self.positional else dict(zip(self.names, values, strict=True))

    def many(self, rows: Sequence[Params]) -> list[list[Any]] | list[dict[str, Any]]:
        """Every row's values (executemany), each distinct value converted once per column (a
        lookup's task rows share their timestamps)."""
        columns: list[tuple[str, _Processor, dict[Any, Any] | None]] = [
            (name, processor, {} if processor else None)
            for name, processor in zip(self.names, self.processors, strict=True)
        ]
        fixed = self.fixed
        converted: list[list[Any]] = []
        for row in rows:
            values: list[Any] = []
            for name, processor, seen in columns:
                value = row[name] if name in row else fixed[name]
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
        if self.positional:
            return converted
        return [dict(zip(self.names, values, strict=True)) for values in converted]

    def arrays_of(self, rows: Sequence[Params]) -> dict[str, Any]:
        """A many-row form's parameters: one array per column of the rows' values, converted
        element by element; the statement's fixed values as they are."""
        parameters: dict[str, Any] = {}
        for name, processor in zip(self.names, self.processors, strict=True):
            if name in self.arrays:
                seen: dict[Any, Any] | None = {} if processor else None
                parameters[name] = [_convert(row, name, {}, processor, seen) for row in rows]
            else:
                value = self.fixed[name]
                parameters[name] = processor(value) if processor else value
        return parameters


def _convert(
    row: Params, name: str, fixed: Mapping[str, Any], processor: _Processor, seen: dict[Any, Any] | None
) -> Any:
    value = row[name] if name in row else fixed[name]
    if processor is None or seen is None:
        return value
    try:
        return seen[value]
    except (KeyError, TypeError):  # new, or unhashable (then converted every time)
        result = processor(value)
        with contextlib.suppress(TypeError):
            seen[value] = result
        return result


def _compile(statement: Executable, dialect: Dialect, keys: Sequence[str] | None = None) -> SQLCompiler:
    compiled = cast(ClauseElement, statement).compile(
        dialect=dialect, column_keys=list(keys) if keys is not None else None
    )
    assert isinstance(compiled, SQLCompiler)
    return compiled


def _names(compiled: SQLCompiler) -> list[str]:
    """The statement's parameters: in order where the paramstyle is positional."""
    if compiled.positiontup is not None:
        return list(compiled.positiontup)
    return list(dict.fromkeys(compiled.bind_names.values()))


class _Statement:
    """A statement compiled for one dialect, and its forms: one, or one per IN list length."""

    def __init__(
        self, statement: Executable, dialect: Dialect, keys: Sequence[str] | None, many: Executable | None
    ) -> None:
        self.dialect = dialect
        self.compiled = _compile(statement, dialect, keys)
        binds: dict[str, BindParameter[Any]] = self.compiled.binds
        self.binds = binds
        names = _names(self.compiled)
        if keys is not None and not set(names) <= set(keys):
            # A column left to its Python-side default would need SQLAlchemy's execution context.
            raise ValueError(f"give every column of the INSERT: {sorted(set(names) - set(keys))} missing")
        self.expanding = [name for name in names if binds[name].expanding]
        if len(self.expanding) > 1:
            raise ValueError("one expanding parameter per prepared statement")
        self.form = None if self.expanding else _Form(self.compiled.string, names, binds, dialect)
        self.expanded: dict[int, _Form] = {}
        self.returns_rows = isinstance(statement, Select)
        self.row: Any = None  # a namedtuple named after the rendered labels, made on first use
        self.results: list[_Processor] = []
        if isinstance(statement, Select):
            self.results = [
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in statement.selected_columns
            ]
        # The many-row form (PostgreSQL), with the element type of each array parameter.
        self.many: _Form | None = None
        if many is not None:
            compiled = _compile(many, dialect)
            many_binds: dict[str, BindParameter[Any]] = compiled.binds
            arrays = {
                name: bind.type.item_type
                for name, bind in many_binds.items()
                if bind.required and isinstance(bind.type, ARRAY)
            }
            self.many = _Form(compiled.string, _names(compiled), many_binds, dialect, arrays=arrays)

    def form_for(self, params: Params) -> _Form:
        if self.form is not None:
            return self.form
        [name] = self.expanding
        items = list(params[name] or ())
        if not items:
            raise ValueError(f"empty IN list for {name}")
        form = self.expanded.get(len(items))
        if form is None:
            # SQLAlchemy renders the list's placeholders (its own public expansion); the values
            # of this call are not kept, only which parameter each placeholder takes.
            state = self.compiled.construct_expanded_state({**params, name: items})
            expansion = state.parameter_expansion[name]
            names = list(state.positiontup) if state.positiontup is not None else list(state.parameters)
            sources = {expanded: (name, index) for index, expanded in enumerate(expansion)}
            binds = {**self.binds, **{expanded: self.binds[name] for expanded in expansion}}
            form = self.expanded[len(items)] = _Form(state.statement, names, binds, self.dialect, sources)
        return form

    def rows(self, cursor: Any) -> list[Any]:
        if self.row is None:
            # The labels SQLAlchemy's rows are keyed by ("max_1" for an unnamed max(), ...).
            labels = [column[0] for column in cursor.description]
            self.row = namedtuple("Row", labels, rename=True)  # type: ignore[misc]
        make = self.row._make
        # Only the columns that have a processor are touched, and each distinct value once: a
        # lookup read joins its banks to the lookup's row, whose datetimes repeat on every row.
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


def unnest_insert(table: Table, keys: Sequence[str]) -> Insert:
    """PostgreSQL's many-row INSERT: `INSERT INTO t (a, b) SELECT ... FROM unnest(:a, :b)`, one
    typed array parameter per column, named after it. One statement text whatever the number of
    rows (a multi-row VALUES is new SQL for every count, never prepared by the server)."""
    arrays = [bindparam(key, type_=ARRAY(table.c[key].type)) for key in keys]
    rows = func.unnest(*arrays).table_valued(*keys).render_derived()
    return insert(table).from_select(
        list(keys), select(*(rows.c[key] for key in keys)), include_defaults=False
    )


class KeyedUpdate:
    """An UPDATE of the rows picked by equalities on `keys` (parameters k_<column>), setting
    `values` from parameters (v_<column>) and `fixed` to constants, with its PostgreSQL many-row
    form: `UPDATE t SET ... FROM unnest(:k_a, :v_b, ...) AS rows WHERE t.a = rows.k_a`."""

    def __init__(
        self, table: Table, keys: Sequence[str], values: Sequence[str], fixed: Mapping[str, Any]
    ) -> None:
        self.one = (
            update(table)
            .where(*(table.c[key] == bindparam(f"k_{key}") for key in keys))
            .values({**{column: bindparam(f"v_{column}") for column in values}, **fixed})
        )
        names = [f"k_{key}" for key in keys] + [f"v_{column}" for column in values]
        arrays = [bindparam(name, type_=ARRAY(table.c[name[2:]].type)) for name in names]
        rows = func.unnest(*arrays).table_valued(*names).render_derived()
        self.many = (
            update(table)
            .where(*(table.c[key] == rows.c[f"k_{key}"] for key in keys))
            .values({**{column: rows.c[f"v_{column}"] for column in values}, **fixed})
        )
        self.key_names = [f"k_{key}" for key in keys]


class Prepared:
    """A hot statement. `run(c, params)` executes it once and returns the rows of a SELECT
    (attribute access by column name, like SQLAlchemy's rows; [] for other statements);
    `run_many(c, rows)` executes it for each parameter set."""

    def __init__(self, statement: Executable | KeyedUpdate) -> None:
        self._keyed = statement if isinstance(statement, KeyedUpdate) else None
        self.statement: Executable = statement.one if isinstance(statement, KeyedUpdate) else statement
        self._compiled: dict[tuple[type[Dialect], tuple[str, ...] | None], _Statement] = {}

    def _for(self, c: Connection, params: Params) -> _Statement:
        # Once per dialect (statements are shared by every store in the process); an INSERT
        # renders the columns it is given, every other statement renders once.
        keys = tuple(params) if isinstance(self.statement, Insert) else None
        key = (type(c.dialect), keys)
        compiled = self._compiled.get(key)
        if compiled is None:
            many: Executable | None = None
            if c.dialect.name == "postgresql":
                if keys is not None:
                    many = unnest_insert(cast(Table, cast(Insert, self.statement).table), keys)
                elif self._keyed is not None:
                    many = self._keyed.many
            compiled = self._compiled[key] = _Statement(self.statement, c.dialect, keys, many)
        return compiled

    def run(self, c: Connection, params: Params) -> list[Any]:
        compiled = self._for(c, params)
        form = compiled.form_for(params)
        with _as_sqlalchemy_errors(form.sql, params):
            executed = _driver(c).execute(form.sql, form.values(params))
            return compiled.rows(executed) if compiled.returns_rows else []

    def run_many(self, c: Connection, rows: Sequence[Params]) -> None:
        if not rows:
            return
        compiled = self._for(c, rows[0])
        if compiled.form is None:
            raise ValueError("executemany with an expanding parameter")
        driver = _driver(c)
        many = compiled.many
        if many is not None and self._keyed is not None and not _distinct(rows, self._keyed.key_names):
            many = None  # rows that pick the same row: each must apply in turn, as executemany does
        with _as_sqlalchemy_errors(compiled.form.sql, rows):
            if many is not None:
                driver.execute(many.sql, many.arrays_of(rows))
            elif isinstance(driver, sqlite3.Connection):
                driver.executemany(compiled.form.sql, compiled.form.many(rows))
            else:
                with driver.cursor() as cursor:
                    cursor.executemany(compiled.form.sql, compiled.form.many(rows))


def send_arrays_in_binary(engine: Engine) -> None:
    """PostgreSQL: psycopg sends a list parameter (the many-row forms' arrays) in its binary
    format rather than as text whose every element it must quote. The union passes no other
    lists to PostgreSQL."""
    if engine.dialect.name != "postgresql":
        return

    @event.listens_for(engine, "connect")
    def _binary_lists(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.adapters.register_dumper(list, ListBinaryDumper)


def _distinct(rows: Sequence[Params], keys: list[str]) -> bool:
    """Whether no two rows have the same values at `keys`: then one UPDATE ... FROM their arrays
    changes each row once, as executemany would (with duplicates, PostgreSQL would apply only one
    of them, where executemany applies each in turn)."""
    return len({tuple(row[key] for key in keys) for row in rows}) == len(rows)


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
