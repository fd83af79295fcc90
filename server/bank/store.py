"""One bank's own database: its customers and their cards.

Each simulated bank keeps a separate store (by default a SQLite file of its
own) so banks behave like separate systems. Full card numbers live only here;
everything that leaves the bank goes through `server.bank.masking`.

The engine is synchronous; the gRPC servicer calls it through
`asyncio.to_thread` (no async SQLite driver is a dependency of this project).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Date,
    Engine,
    ForeignKey,
    Index,
    String,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from server.population import generator

CARD_TYPES = ("debit", "credit")
CARD_STATUSES = ("active", "dormant", "frozen", "closed")
_SEED_BATCH = 5000


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


@dataclass(frozen=True)
class StoredCard:
    """A card as read from the store, detached from any session."""

    card_ref: str
    number: str
    card_type: str
    status: str
    open_date: date
    last_activity_date: date


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
    }


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
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def create_schema(self) -> None:
        Base.metadata.create_all(self._engine)

    def close(self) -> None:
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
        return [
            StoredCard(
                card_ref=row.card_ref,
                number=row.number,
                card_type=row.card_type,
                status=row.status,
                open_date=row.open_date,
                last_activity_date=row.last_activity_date,
            )
            for row in session.scalars(query)
        ]

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
    ) -> StoredCard:
        if card_type not in CARD_TYPES:
            raise ValueError(f"card type must be one of {CARD_TYPES}")
        if status not in CARD_STATUSES:
            raise ValueError(f"status must be one of {CARD_STATUSES}")
        opened = open_date or date.today()
        card = BankCard(
            card_ref=new_card_ref(),
            number=number,
            card_type=card_type,
            status=status,
            open_date=opened,
            last_activity_date=last_activity_date or opened,
            customer_id=resident_id_number,
        )
        with self._sessions.begin() as session:
            if session.get(Customer, resident_id_number) is None:
                raise LookupError("no such customer")
            session.add(card)
        return StoredCard(
            card_ref=card.card_ref,
            number=card.number,
            card_type=card.card_type,
            status=card.status,
            open_date=card.open_date,
            last_activity_date=card.last_activity_date,
        )


def seed_stores(stores: Mapping[str, BankStore], seed: int, size: int) -> dict[str, int]:
    """Seed several banks' stores in one pass over the population; returns customers added per bank.

    Each bank receives only the people who hold at least one card there, with
    only the cards they hold there.
    """
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
