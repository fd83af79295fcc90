"""One bank's own database: its customers and their cards.

Each simulated bank keeps a separate store (by default a SQLite file of its
own) so banks behave like separate systems. Full card numbers live only here;
everything that leaves the bank goes through `server.bank.masking`.

The engine is synchronous; the gRPC servicer calls it through
`asyncio.to_thread` (no async SQLite driver is a dependency of this project).

Card actions (CloseCard, ReportCardNotMine) go through `answer_once`: it checks
the card belongs to the person, decides through a caller-supplied function
(server.bank.actions), applies the change to the card and records the answer
under the request's idempotency key, all in one transaction, so a retry gets
the first answer back without a second decision.

Schema changes are migrations: `MIGRATIONS` below is the numbered list of
them, and `create_schema` (called whenever a store is opened) applies those a
store has not had yet, recording its version in `schema_version`. A list rather
than Alembic, as the union uses: the bank's schema is two tables that only ever
gain columns, each simulated bank opens its own store at start, and a list of
statements in this file says all of it without an environment, a script
template and a directory of revision files per bank.

Longer than most modules (~640 lines) on purpose: it is the whole of one
bank's storage (models, migrations, reads, card actions, seeding), the only
place a full card number is stored, and reads best as one file.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    CheckConstraint,
    Connection,
    Date,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from server.population import generator
from server.population.catalogue import BankInfo

CARD_TYPES = ("debit", "credit")
CARD_STATUSES = ("active", "dormant", "frozen", "closed")
_SEED_BATCH = 5000

log = logging.getLogger(__name__)

ActionKind = Literal["close", "not_mine"]


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"

    resident_id_number: Mapped[str] = mapped_column(String(18), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    mobile_number: Mapped[str] = mapped_column(String(11))


class BankCard(Base):
    __tablename__ = "bank_cards"
    __table_args__ = (
        CheckConstraint("card_type IN ('debit', 'credit')", name="ck_bank_cards_card_type"),
        CheckConstraint("status IN ('active', 'dormant', 'frozen', 'closed')", name="ck_bank_cards_status"),
        Index("ix_bank_cards_customer", "customer_id"),
    )

    # Opaque and random: it reveals nothing about the number and means nothing outside this bank.
    card_ref: Mapped[str] = mapped_column(String(32), primary_key=True)
    number: Mapped[str] = mapped_column(String(19), unique=True)
    card_type: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(8))
    open_date: Mapped[date] = mapped_column(Date)
    last_activity_date: Mapped[date] = mapped_column(Date)
    customer_id: Mapped[str] = mapped_column(ForeignKey("customers.resident_id_number"))
    # Fen: funds on a debit card, the outstanding balance on a credit card.
    balance_cents: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # A credit card whose closure was accepted: it closes at the end of this billing cycle.
    closure_scheduled_on: Mapped[date | None] = mapped_column(Date, nullable=True, default=None)


class SchemaVersion(Base):
    """The one row saying which of MIGRATIONS this store has had."""

    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)


@dataclass(frozen=True)
class Migration:
    """One schema change: what it is for, and its statements (constants, never input)."""

    version: int
    purpose: str
    statements: tuple[str, ...]


# Every schema change since the first release, in order; never edit one that shipped, add the next.
# A new store is created from the models above at the newest version.
MIGRATIONS = (
    Migration(1, "the first release: customers, cards, answered requests", ()),
    Migration(
        2, "card balances", ("ALTER TABLE bank_cards ADD COLUMN balance_cents INTEGER NOT NULL DEFAULT 0",)
    ),
    Migration(
        3,
        "credit cards closing at the end of their cycle",
        ("ALTER TABLE bank_cards ADD COLUMN closure_scheduled_on DATE",),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
# Stores from before schema_version existed: the newest migration whose column they have.
_LEGACY_MARKERS = ((3, "closure_scheduled_on"), (2, "balance_cents"))


class AnsweredRequest(Base):
    """One answered CloseCard/ReportCardNotMine, kept so a retry gets the same answer."""

    __tablename__ = "answered_requests"
    __table_args__ = (CheckConstraint("kind IN ('close', 'not_mine')", name="ck_answered_requests_kind"),)

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    card_ref: Mapped[str] = mapped_column(String(128))
    reference: Mapped[str] = mapped_column(String(32))  # ticket id (close) or case number (not mine)
    outcome: Mapped[str] = mapped_column(String(32))  # closure outcome, or the card's status after a report
    reason: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class StoredCard:
    """A card as read from the store, detached from any session."""

    card_ref: str
    number: str
    card_type: str
    status: str
    open_date: date
    last_activity_date: date
    balance_cents: int = 0
    closure_scheduled_on: date | None = None


@dataclass(frozen=True)
class CardAction:
    """A decision about one card: the answer to record, and the change to make to the card."""

    reference: str
    outcome: str
    reason: str = ""
    new_status: str | None = None  # None: the status stays
    closure_scheduled_on: date | None = None  # set: the card closes at the end of the billing cycle
    clear_closure_schedule: bool = False


@dataclass(frozen=True)
class ActionAnswer:
    """The recorded answer to one request; `replayed` is True when a retry got it back."""

    request_id: str
    kind: str
    card_ref: str
    reference: str
    outcome: str
    reason: str
    created_at: datetime
    replayed: bool = False


class CardNotFound(LookupError):
    """No such card for this person (unknown card, someone else's, or the name does not match)."""


class RequestConflict(ValueError):
    """The request_id was already used for another card (or another kind of request)."""


# find_cards_many: at most this many IDs per statement (SQLite's old limit on bound parameters is 999).
_LOOKUP_CHUNK = 500
_customers = Customer.__table__
_cards = BankCard.__table__
# The one card read of the union's queries. Ordered like _cards_of within each person (rows of
# different people may interleave). Run by SQLAlchemy on PostgreSQL, and on SQLite in its
# compiled form on the reading thread's own connection (_SqliteCardRead).
_CARDS_OF_MANY = (
    select(
        _cards.c.customer_id,
        _customers.c.name,
        _cards.c.card_ref,
        _cards.c.number,
        _cards.c.card_type,
        _cards.c.status,
        _cards.c.open_date,
        _cards.c.last_activity_date,
        _cards.c.balance_cents,
        _cards.c.closure_scheduled_on,
    )
    .select_from(_cards.join(_customers, _cards.c.customer_id == _customers.c.resident_id_number))
    .where(_cards.c.customer_id.in_(bindparam("ids", expanding=True)), _cards.c.status != "closed")
    .order_by(_cards.c.open_date, _cards.c.card_ref)
)


class _SqliteCardRead:
    """_CARDS_OF_MANY on the sqlite3 connection itself, without SQLAlchemy's per-execution work
    (which cost more than the read): SQLAlchemy compiles it once, expands its IN list once per
    number of IDs (`construct_expanded_state`), and the columns' own result processors convert
    what sqlite3 returns, so the rows are the ones SQLAlchemy would give."""

    def __init__(self, dialect: Dialect) -> None:
        self._compiled = _CARDS_OF_MANY.compile(dialect=dialect)
        # Per number of IDs: the SQL, its parameters, and where in them the IDs go.
        self._forms: dict[int, tuple[str, list[Any], list[int]]] = {}
        # The columns whose stored form differs from the Python value (dates), with their converter.
        processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in _CARDS_OF_MANY.selected_columns
        ]
        self._converting = [(index, p) for index, p in enumerate(processors) if p is not None]

    def __call__(self, reader: sqlite3.Connection, ids: list[str]) -> Iterator[list[Any]]:
        form = self._forms.get(len(ids))
        if form is None:
            state = self._compiled.construct_expanded_state({"ids": ids})
            expanded = state.parameter_expansion["ids"]
            slots = [index for index, name in enumerate(state.positiontup or ()) if name in expanded]
            form = self._forms[len(ids)] = (state.statement, list(state.positional_parameters), slots)
        sql, template, slots = form
        parameters = list(template)
        for slot, resident_id in zip(slots, ids, strict=True):
            parameters[slot] = resident_id
        converting = self._converting
        for raw in reader.execute(sql, parameters):
            row = list(raw)
            for index, convert in converting:
                row[index] = convert(row[index])
            yield row


def new_card_ref() -> str:
    return "cr_" + secrets.token_hex(12)


def default_database_url(data_dir: Path | str, bank_code: str) -> str:
    return f"sqlite:///{data_dir}/{bank_code.lower()}.sqlite3"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the seeding thread write while query threads read; NORMAL is safe with WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _card_row(card: generator.Card, customer_id: str) -> dict[str, Any]:
    return {
        "card_ref": new_card_ref(),
        "number": card.number,
        "card_type": card.card_type,
        "status": card.status,
        "open_date": card.open_date,
        "last_activity_date": card.last_activity_date,
        "customer_id": customer_id,
        "balance_cents": card.balance_cents,
    }


def _stored(row: Any) -> StoredCard:
    """A card from its ORM object (BankCard) or from a Core row with the bank_cards columns."""
    return StoredCard(
        card_ref=row.card_ref,
        number=row.number,
        card_type=row.card_type,
        status=row.status,
        open_date=row.open_date,
        last_activity_date=row.last_activity_date,
        balance_cents=row.balance_cents,
        closure_scheduled_on=row.closure_scheduled_on,
    )


def _answer(row: AnsweredRequest, replayed: bool) -> ActionAnswer:
    return ActionAnswer(
        request_id=row.request_id,
        kind=row.kind,
        card_ref=row.card_ref,
        reference=row.reference,
        outcome=row.outcome,
        reason=row.reason,
        created_at=row.created_at,
        replayed=replayed,
    )


class BankStore:
    """The bank's customers and cards, in the bank's own database."""

    def __init__(self, bank_code: str, database_url: str) -> None:
        self.bank_code = bank_code
        self.database_url = database_url
        is_sqlite = database_url.startswith("sqlite")
        self._engine: Engine = create_engine(
            database_url,
            # Calls arrive on asyncio.to_thread worker threads.
            connect_args={"check_same_thread": False} if is_sqlite else {},
        )
        if is_sqlite:
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._is_sqlite = is_sqlite
        self._sqlite_card_read = _SqliteCardRead(self._engine.dialect) if is_sqlite else None
        # A local SQLite file answers a small read faster than a thread hop (see the bank service).
        self.reads_locally = is_sqlite and ":memory:" not in database_url
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        # Card actions in this process one at a time: SQLite cannot upgrade two concurrent
        # read transactions to writes, and a retry racing its original must see its answer.
        self._action_lock = threading.Lock()
        # SQLite card reads: each thread keeps one connection (a pool checkout and the rollback on
        # its return cost more than the read itself). No transaction is held between reads, so
        # every read sees what is committed.
        self._readers = threading.local()
        self._reader_connections: list[Any] = []
        self._readers_lock = threading.Lock()

    def _reader(self) -> sqlite3.Connection:
        proxy = getattr(self._readers, "connection", None)
        if proxy is None:
            proxy = self._engine.raw_connection()
            self._readers.connection = proxy
            with self._readers_lock:
                self._reader_connections.append(proxy)
        driver = proxy.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        return driver

    def create_schema(self) -> None:
        """A new store at the newest schema; an existing one brought there by the MIGRATIONS it
        has not had, in one transaction."""
        with self._engine.begin() as connection:
            tables = set(inspect(connection).get_table_names())
            if BankCard.__tablename__ not in tables:
                Base.metadata.create_all(connection)
                connection.execute(insert(SchemaVersion).values(version=SCHEMA_VERSION))
                return
            version = self.schema_version(connection, tables)
            pending = [m for m in MIGRATIONS if m.version > version]
            if not pending:
                return
            for migration in pending:
                for statement in migration.statements:
                    connection.execute(text(statement))
            Base.metadata.create_all(connection)  # tables added since (schema_version among them)
            connection.execute(delete(SchemaVersion))
            connection.execute(insert(SchemaVersion).values(version=SCHEMA_VERSION))
        log.warning(
            "upgraded a bank store created by an older version; cards from before balances hold 0",
            extra={"bank": self.bank_code, "migrations": [m.version for m in pending]},
        )

    @staticmethod
    def schema_version(connection: Connection, tables: set[str]) -> int:
        """The store's version: recorded, or for a store from before it was, read off its columns."""
        if SchemaVersion.__tablename__ in tables:
            return connection.scalar(select(func.max(SchemaVersion.version))) or 1
        present = {column["name"] for column in inspect(connection).get_columns(BankCard.__tablename__)}
        return next((version for version, column in _LEGACY_MARKERS if column in present), 1)

    def close(self) -> None:
        with self._readers_lock:
            readers, self._reader_connections = self._reader_connections, []
        for proxy in readers:
            proxy.close()
        self._readers = threading.local()
        self._engine.dispose()

    def customer_count(self) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(Customer)) or 0

    def card_count(self) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(BankCard)) or 0

    def is_empty(self) -> bool:
        return self.customer_count() == 0

    def seed(self, seed: int, size: int) -> int:
        """Fill the store with this bank's share of the synthetic population; returns customers added."""
        return seed_stores({self.bank_code: self}, seed, size)[self.bank_code]

    def insert_batch(
        self, customers: Sequence[Mapping[str, Any]], cards: Sequence[Mapping[str, Any]]
    ) -> None:
        """Bulk insert (one executemany per table): seeding speed depends on it."""
        if not customers and not cards:
            return
        with self._sessions.begin() as session:
            if customers:
                session.execute(insert(Customer), list(customers))
            if cards:
                session.execute(insert(BankCard), list(cards))

    def find_cards(
        self, resident_id_number: str, name: str, include_closed: bool = False
    ) -> list[StoredCard]:
        """The person's cards; a name that does not match answers like an unknown person."""
        with self._sessions() as session:
            customer = session.get(Customer, resident_id_number)
            if customer is None or customer.name != name:
                return []
            return self._cards_of(session, resident_id_number, include_closed)

    def find_cards_many(self, people: Sequence[tuple[str, str]]) -> list[list[StoredCard]]:
        """`find_cards` for many (resident_id_number, name) pairs at once, answers in the same order.

        QuerySession batches the queries that arrive while a read is in progress into one call:
        one Core SELECT per chunk of IDs instead of an ORM session and two queries per person,
        which is what lets one bank answer thousands of queries a second.
        """
        wanted = list(dict.fromkeys(resident_id for resident_id, _ in people))
        names: dict[str, str] = {}
        cards: dict[str, list[StoredCard]] = {}
        chunks = [wanted[start : start + _LOOKUP_CHUNK] for start in range(0, len(wanted), _LOOKUP_CHUNK)]
        with contextlib.ExitStack() as stack:
            rows: Iterable[Sequence[Any]]
            if self._sqlite_card_read is not None:
                read, reader = self._sqlite_card_read, self._reader()
                rows = (row for chunk in chunks for row in read(reader, chunk))
            else:
                connection = stack.enter_context(self._engine.connect())
                rows = (row for chunk in chunks for row in connection.execute(_CARDS_OF_MANY, {"ids": chunk}))
            for customer_id, name, *card in rows:
                names[customer_id] = name
                # The read selects StoredCard's fields, in its order, after the person's.
                cards.setdefault(customer_id, []).append(StoredCard(*card))
        # A name that does not match answers like an unknown person, as in find_cards. The lists
        # are shared between repeated pairs; StoredCard is frozen and callers only read them.
        return [
            cards.get(resident_id, []) if names.get(resident_id) == name else []
            for resident_id, name in people
        ]

    def cards_for_id(self, resident_id_number: str, include_closed: bool = True) -> list[StoredCard]:
        """Operator view by ID number alone (the bank's own tools, not the union contract)."""
        with self._sessions() as session:
            return self._cards_of(session, resident_id_number, include_closed)

    @staticmethod
    def _cards_of(session: Session, resident_id_number: str, include_closed: bool) -> list[StoredCard]:
        query = select(BankCard).where(BankCard.customer_id == resident_id_number)
        if not include_closed:
            query = query.where(BankCard.status != "closed")
        query = query.order_by(BankCard.open_date, BankCard.card_ref)
        return [_stored(row) for row in session.scalars(query)]

    def find_card(self, resident_id_number: str, name: str, card_ref: str) -> StoredCard | None:
        """One of the person's cards, closed ones included; None if it is not theirs (or the name differs)."""
        with self._sessions() as session:
            row = self._owned_card(session, resident_id_number, name, card_ref)
            return None if row is None else _stored(row)

    @staticmethod
    def _owned_card(session: Session, resident_id_number: str, name: str, card_ref: str) -> BankCard | None:
        customer = session.get(Customer, resident_id_number)
        if customer is None or customer.name != name:
            return None
        row = session.get(BankCard, card_ref)
        if row is None or row.customer_id != resident_id_number:
            return None
        return row

    def answered(self, request_id: str) -> ActionAnswer | None:
        """The recorded answer for a request_id, if any."""
        with self._sessions() as session:
            row = session.get(AnsweredRequest, request_id)
            return None if row is None else _answer(row, replayed=True)

    def answer_once(
        self,
        kind: ActionKind,
        request_id: str,
        resident_id_number: str,
        name: str,
        card_ref: str,
        decide: Callable[[StoredCard], CardAction],
    ) -> ActionAnswer:
        """Answer a card action exactly once per request_id.

        Raises RequestConflict if request_id was used for another card or kind, CardNotFound if
        the card is not this person's. A repeated request gets the recorded answer (replayed=True)
        and `decide` is not called; otherwise `decide` sees the card as stored, and its change and
        answer are committed together.
        """
        with self._action_lock:
            try:
                return self._answer_once(kind, request_id, resident_id_number, name, card_ref, decide)
            except IntegrityError:
                # Another process answered the same request_id first: replay its answer.
                return self._answer_once(kind, request_id, resident_id_number, name, card_ref, decide)

    def _answer_once(
        self,
        kind: ActionKind,
        request_id: str,
        resident_id_number: str,
        name: str,
        card_ref: str,
        decide: Callable[[StoredCard], CardAction],
    ) -> ActionAnswer:
        with self._sessions.begin() as session:
            previous = session.get(AnsweredRequest, request_id)
            if previous is not None and (previous.kind != kind or previous.card_ref != card_ref):
                raise RequestConflict("request_id was already used for another request")
            card = self._owned_card(session, resident_id_number, name, card_ref)
            if card is None:
                raise CardNotFound("no such card")
            if previous is not None:
                return _answer(previous, replayed=True)
            action = decide(_stored(card))
            if action.new_status is not None:
                if action.new_status not in CARD_STATUSES:
                    raise ValueError(f"status must be one of {CARD_STATUSES}")
                card.status = action.new_status
            if action.clear_closure_schedule:
                card.closure_scheduled_on = None
            if action.closure_scheduled_on is not None:
                card.closure_scheduled_on = action.closure_scheduled_on
            row = AnsweredRequest(
                request_id=request_id,
                kind=kind,
                card_ref=card_ref,
                reference=action.reference,
                outcome=action.outcome,
                reason=action.reason,
                created_at=datetime.now(UTC),
            )
            session.add(row)
            session.flush()
            return _answer(row, replayed=False)

    def add_customer(self, resident_id_number: str, name: str, mobile_number: str) -> None:
        with self._sessions.begin() as session:
            session.add(
                Customer(resident_id_number=resident_id_number, name=name, mobile_number=mobile_number)
            )

    def add_card(
        self,
        resident_id_number: str,
        number: str,
        card_type: str,
        status: str = "active",
        open_date: date | None = None,
        last_activity_date: date | None = None,
        balance_cents: int = 0,
    ) -> StoredCard:
        if card_type not in CARD_TYPES:
            raise ValueError(f"card type must be one of {CARD_TYPES}")
        if status not in CARD_STATUSES:
            raise ValueError(f"status must be one of {CARD_STATUSES}")
        if balance_cents < 0:
            raise ValueError("balance must not be negative")
        opened = open_date or date.today()
        card = BankCard(
            card_ref=new_card_ref(),
            number=number,
            card_type=card_type,
            status=status,
            open_date=opened,
            last_activity_date=last_activity_date or opened,
            customer_id=resident_id_number,
            balance_cents=balance_cents,
        )
        with self._sessions.begin() as session:
            if session.get(Customer, resident_id_number) is None:
                raise LookupError("no such customer")
            session.add(card)
        return _stored(card)


def seed_stores(
    stores: Mapping[str, BankStore],
    seed: int,
    size: int,
    joining: Mapping[str, BankInfo] | None = None,
) -> dict[str, int]:
    """Seed several banks' stores in one pass over the population; returns customers added per bank.

    Each bank receives only the people who hold at least one card there, with
    only the cards they hold there. `joining` describes the banks outside the
    built-in 16 (their names and BINs come from their configuration).
    """
    joining_banks = {code: info for code, info in (joining or {}).items() if code in stores}
    customers: dict[str, list[dict[str, Any]]] = {code: [] for code in stores}
    cards: dict[str, list[dict[str, Any]]] = {code: [] for code in stores}
    added = dict.fromkeys(stores, 0)

    def flush(codes: Iterable[str]) -> None:
        for code in codes:
            stores[code].insert_batch(customers[code], cards[code])
            added[code] += len(customers[code])
            customers[code].clear()
            cards[code].clear()

    for person in generator.people(seed, size):
        held: dict[str, list[generator.Card]] = {}
        for card in generator.cards_of(seed, person):
            if card.bank_code in stores:
                held.setdefault(card.bank_code, []).append(card)
        for code, info in joining_banks.items():
            if at_joining := generator.cards_at_joining_bank(seed, person, info):
                held[code] = at_joining
        for code, bank_cards in held.items():
            customers[code].append(
                {
                    "resident_id_number": person.resident_id_number,
                    "name": person.name,
                    "mobile_number": person.mobile_number,
                }
            )
            cards[code].extend(_card_row(card, person.resident_id_number) for card in bank_cards)
            if len(cards[code]) >= _SEED_BATCH:
                flush([code])
    flush(stores)
    return added
