"""The bank's store: its schema changes as numbered migrations, and its one card read, which on
SQLite runs on the driver's connection and must answer exactly what SQLAlchemy answers."""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path

from sqlalchemy import inspect, select

from server.bank.store import _CARDS_OF_MANY, MIGRATIONS, SCHEMA_VERSION, BankStore, SchemaVersion
from server.population.generator import DEMO_PEOPLE

ZHANG = DEMO_PEOPLE[0]

# The first release's tables (version 1), and version 2's addition.
_VERSION_1 = """
CREATE TABLE customers (
    resident_id_number VARCHAR(18) NOT NULL PRIMARY KEY,
    name VARCHAR(64) NOT NULL,
    mobile_number VARCHAR(11) NOT NULL
);
CREATE TABLE bank_cards (
    card_ref VARCHAR(32) NOT NULL PRIMARY KEY,
    number VARCHAR(19) NOT NULL UNIQUE,
    card_type VARCHAR(8) NOT NULL,
    status VARCHAR(8) NOT NULL,
    open_date DATE NOT NULL,
    last_activity_date DATE NOT NULL,
    customer_id VARCHAR(18) NOT NULL REFERENCES customers (resident_id_number)
);
CREATE TABLE answered_requests (
    request_id VARCHAR(64) NOT NULL PRIMARY KEY,
    kind VARCHAR(16) NOT NULL,
    card_ref VARCHAR(128) NOT NULL,
    reference VARCHAR(32) NOT NULL,
    outcome VARCHAR(32) NOT NULL,
    reason VARCHAR(256) NOT NULL,
    created_at DATETIME NOT NULL
);
"""
_VERSION_2 = "ALTER TABLE bank_cards ADD COLUMN balance_cents INTEGER NOT NULL DEFAULT 0;"


def _old_store(path: Path, script: str) -> None:
    card = next(c for c in ZHANG.cards if c.bank_code == "ICBC")
    with sqlite3.connect(path) as connection:
        connection.executescript(script)
        connection.execute(
            "INSERT INTO customers VALUES (?, ?, ?)",
            (ZHANG.person.resident_id_number, ZHANG.person.name, ZHANG.person.mobile_number),
        )
        connection.execute(
            "INSERT INTO bank_cards (card_ref, number, card_type, status, open_date, last_activity_date,"
            " customer_id) VALUES ('cr_old', ?, ?, 'active', '2019-03-02', '2024-01-05', ?)",
            (card.number, card.card_type, ZHANG.person.resident_id_number),
        )
    connection.close()


def _version(store: BankStore) -> int | None:
    with store._engine.connect() as connection:
        return connection.scalar(select(SchemaVersion.version))


def _columns(store: BankStore) -> set[str]:
    return {column["name"] for column in inspect(store._engine).get_columns("bank_cards")}


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert MIGRATIONS[-1].version == SCHEMA_VERSION


def test_a_new_store_starts_at_the_newest_version(tmp_path: Path) -> None:
    store = BankStore("ICBC", f"sqlite:///{tmp_path / 'new.sqlite3'}")
    try:
        store.create_schema()
        assert _version(store) == SCHEMA_VERSION
        store.create_schema()  # opening it again changes nothing
        assert _version(store) == SCHEMA_VERSION
    finally:
        store.close()


def test_stores_of_every_older_version_are_upgraded_keeping_their_cards(tmp_path: Path) -> None:
    fresh = BankStore("ICBC", f"sqlite:///{tmp_path / 'fresh.sqlite3'}")
    fresh.create_schema()
    newest = _columns(fresh)
    fresh.close()
    for name, script in [("v1", _VERSION_1), ("v2", _VERSION_1 + _VERSION_2)]:
        path = tmp_path / f"{name}.sqlite3"
        _old_store(path, script)
        store = BankStore("ICBC", f"sqlite:///{path}")
        try:
            store.create_schema()
            assert _version(store) == SCHEMA_VERSION, name
            assert _columns(store) == newest, name
            [card] = store.find_cards(ZHANG.person.resident_id_number, ZHANG.person.name)
            assert (card.card_ref, card.open_date, card.balance_cents) == ("cr_old", date(2019, 3, 2), 0)
            assert card.closure_scheduled_on is None
        finally:
            store.close()


def test_the_card_read_on_sqlite_answers_what_sqlalchemy_answers(tmp_path: Path) -> None:
    store = BankStore("ICBC", f"sqlite:///{tmp_path / 'icbc.sqlite3'}")
    try:
        store.create_schema()
        store.seed(seed=7, size=400)
        with store._engine.connect() as connection:
            held = [row[0] for row in connection.execute(select(_CARDS_OF_MANY.selected_columns[0])).all()]
            ids = [*list(dict.fromkeys(held))[:40], "000000000000000000"]  # and one unknown person
            expected = [tuple(row) for row in connection.execute(_CARDS_OF_MANY, {"ids": ids})]
        assert expected
        read = store._sqlite_card_read
        assert read is not None
        assert [tuple(row) for row in read(store._reader(), ids)] == expected
        assert [tuple(row) for row in read(store._reader(), ids[:3])] == [
            row for row in expected if row[0] in ids[:3]
        ]
    finally:
        store.close()
