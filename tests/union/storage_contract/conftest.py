"""A migrated, seeded store on each backend, and the values the contract tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest

from server.population.catalogue import BANKS, REGIONS
from server.union.domain import model
from server.union.storage.database import Store, open_store

NOW = datetime(2026, 12, 5, 8, 0, 0, 123456, tzinfo=UTC)
DEADLINE = NOW + timedelta(hours=24)
OWNER = "replica-1"
LEASE = timedelta(seconds=30)
PERSON = "p" * 64
STRANGER = "s" * 64


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """What the composition root builds: open_store, migrate, seed the catalogue."""
    opened = open_store(database_url)
    opened.migrate()
    await opened.seed_catalogue(BANKS, {}, REGIONS, NOW)
    try:
        yield opened
    finally:
        await opened.close()


def plan(report_id: str, expire: datetime = NOW + timedelta(days=7)) -> Callable[[], model.ReportPlan]:
    return lambda: model.ReportPlan(report_id, expire)


def card(card_ref: str, bank: model.Bank, last_four: str, debit: bool = True) -> model.MaskedCard:
    return model.MaskedCard(
        card_ref=card_ref,
        bank_code=bank.code,
        bank_name=bank.name,
        card_type=model.CardType.DEBIT if debit else model.CardType.CREDIT,
        first_four="6222",
        last_four=last_four,
        number_length=19,
        status=model.CardStatus.ACTIVE,
        open_time=NOW - timedelta(days=400),
    )


async def new_lookup(
    store: Store,
    lookup_id: str,
    banks: list[model.Bank],
    person: str = PERSON,
    claim: bool = True,
    request_id: str | None = None,
    admit: Callable[[model.PersonActivity], model.Admission | None] | None = None,
) -> tuple[model.Lookup, list[model.Claim], bool]:
    return await store.create_lookup(
        lookup_id=lookup_id,
        person_hash=person,
        request_id=request_id or f"req-{lookup_id}",
        request_fingerprint=f"fp-{lookup_id}",
        region_code="310000",
        sealed_identity="sealed-identity",
        sealed_contact="sealed-contact",
        banks=banks,
        now=NOW,
        deadline=DEADLINE,
        claim=model.ClaimRequest(OWNER, frozenset(b.code for b in banks), LEASE) if claim else None,
        admit=admit,
    )
