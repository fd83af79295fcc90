"""The synthetic population: valid identifiers, determinism, uniqueness, realistic spread."""

from __future__ import annotations

import time
from collections import Counter
from datetime import date

import pytest

from server.common.checks import is_luhn_valid, is_valid_resident_id
from server.population.catalogue import BANKS_BY_CODE, REGIONS_BY_CODE
from server.population.generator import (
    DEMO_PEOPLE,
    DORMANCY,
    REFERENCE_DATE,
    Card,
    Person,
    birth_date_of,
    card_number,
    cards_at_bank,
    cards_of,
    people,
    person_at,
)

SEED = 20211201
_MOBILE_PREFIXES = ("13", "15", "18", "19")


@pytest.fixture(scope="module")
def population() -> list[tuple[Person, list[Card]]]:
    """20,000 people with their cards, generated once for the tests that only read them."""
    return [(person, cards_of(SEED, person)) for person in people(SEED, 20_000)]


def _sample(size: int = 5000) -> list[Person]:
    return list(people(SEED, size))


def test_people_have_valid_identity_fields() -> None:
    for person in _sample():
        assert is_valid_resident_id(person.resident_id_number), person
        assert person.region_code == person.resident_id_number[:2] + "0000"
        assert person.region_code in REGIONS_BY_CODE
        assert date(1950, 1, 1) <= birth_date_of(person.resident_id_number) <= date(2006, 12, 31)
        assert 2 <= len(person.name) <= 3
        assert len(person.mobile_number) == 11
        assert person.mobile_number.isdigit()
        assert person.mobile_number.startswith(_MOBILE_PREFIXES)


def test_cards_use_real_bins_lengths_and_luhn() -> None:
    total = 0
    for person in _sample():
        for card in cards_of(SEED, person):
            bank = BANKS_BY_CODE[card.bank_code]
            bins = bank.debit_bins if card.card_type == "debit" else bank.credit_bins
            matching = [b for b in bins if card.number.startswith(b.prefix)]
            assert matching, card
            assert len(card.number) == matching[0].length
            assert 16 <= len(card.number) <= 19
            assert is_luhn_valid(card.number), card
            assert card.status in ("active", "dormant", "frozen", "closed")
            assert card.open_date <= card.last_activity_date <= REFERENCE_DATE
            birth = birth_date_of(person.resident_id_number)
            assert card.open_date > birth
            total += 1
    assert total > 5000


def test_statuses_follow_activity() -> None:
    statuses: Counter[str] = Counter()
    for person in _sample():
        for card in cards_of(SEED, person):
            statuses[card.status] += 1
            if card.status == "dormant":
                assert card.last_activity_date < REFERENCE_DATE - DORMANCY
            if card.status == "active":
                assert card.last_activity_date >= REFERENCE_DATE - DORMANCY
    total = sum(statuses.values())
    assert statuses["active"] / total > 0.7
    for status in ("dormant", "frozen", "closed"):
        assert 0.005 < statuses[status] / total < 0.15, statuses


def test_deterministic_and_pure() -> None:
    first = [(p, cards_of(SEED, p)) for p in people(SEED, 300)]
    again = [(p, cards_of(SEED, p)) for p in people(SEED, 300)]
    assert first == again
    # Any index can be regenerated alone, in any order.
    assert person_at(SEED, 250) == first[250][0]
    assert cards_of(SEED, person_at(SEED, 123)) == first[123][1]
    # A different seed gives a different population (demo people aside).
    other = [p.resident_id_number for p in people(SEED + 1, 300)]
    assert other[10:] != [p.resident_id_number for p, _ in first][10:]


def test_cards_at_bank_is_the_bank_share() -> None:
    for person in _sample(500):
        everything = cards_of(SEED, person)
        split = [card for bank in BANKS_BY_CODE for card in cards_at_bank(SEED, person, bank)]
        assert sorted(split, key=lambda c: c.number) == sorted(everything, key=lambda c: c.number)


@pytest.mark.slow
def test_ids_mobiles_and_card_numbers_unique_in_200k() -> None:
    started = time.perf_counter()
    ids: set[str] = set()
    mobiles: set[str] = set()
    size = 200_000
    for person in people(SEED, size):
        ids.add(person.resident_id_number)
        mobiles.add(person.mobile_number[3:])
    elapsed = time.perf_counter() - started
    assert len(ids) == size
    assert len(mobiles) == size
    # Streamed, never held in memory; how long it takes is a benchmark's business, not a test's.
    print(f"generated and checked {size} people in {elapsed:.1f} s")


def test_card_numbers_unique(population: list[tuple[Person, list[Card]]]) -> None:
    numbers = [card.number for _, cards in population for card in cards]
    assert len(numbers) == len(set(numbers))
    # The construction guarantees it far beyond the sample: distinct (index, ordinal) never collide.
    bin_ = BANKS_BY_CODE["ICBC"].debit_bins[0]
    indices = range(0, 10_000_000, 99_991)
    probe = {card_number(bin_, index, ordinal) for index in indices for ordinal in range(3)}
    assert len(probe) == 3 * len(indices)


def test_distribution_is_plausible(population: list[tuple[Person, list[Card]]]) -> None:
    sample = [person for person, _ in population]
    card_counts = [len(cards) for _, cards in population]
    bank_counts = [len({c.bank_code for c in cards}) for _, cards in population]
    assert sum(1 for n in card_counts if n <= 6) / len(sample) > 0.9
    assert sum(1 for n in card_counts if n == 0) / len(sample) > 0.03
    assert max(bank_counts) <= 5
    regions = Counter(p.region_code for p in sample)
    pilot = sum(n for code, n in regions.items() if REGIONS_BY_CODE[code].pilot_open_date is not None)
    assert 0.65 < pilot / len(sample) < 0.85
    assert regions["440000"] > 0  # people outside the pilot regions exist too
    types = Counter(card.card_type for _, cards in population for card in cards)
    credit, debit = types["credit"], types["debit"]
    assert 0.2 < credit / (credit + debit) < 0.4


def test_heavy_holders_exist_at_the_expected_rate(population: list[tuple[Person, list[Card]]]) -> None:
    heavy = []
    for person, cards in population:
        per_bank = Counter(card.bank_code for card in cards)
        if per_bank and max(per_bank.values()) >= 50:
            heavy.append(person)
    # About 1 in 500 (plus the demo heavy holder): 40 expected among 20,000.
    assert 15 <= len(heavy) <= 80


def test_demo_people() -> None:
    assert [d.person.index for d in DEMO_PEOPLE] == list(range(len(DEMO_PEOPLE)))
    by_name = {d.person.name: d for d in DEMO_PEOPLE}
    for demo in DEMO_PEOPLE:
        assert is_valid_resident_id(demo.person.resident_id_number)
        assert person_at(SEED, demo.person.index) == demo.person
        assert person_at(7, demo.person.index) == demo.person  # the same in every population
        assert cards_of(SEED, demo.person) == list(demo.cards)
        assert all(is_luhn_valid(card.number) for card in demo.cards)
    assert list(people(SEED, 2)) == [DEMO_PEOPLE[0].person, DEMO_PEOPLE[1].person]

    zhang = by_name["张伟"]
    assert zhang.person.resident_id_number == "310104198503129915"
    assert zhang.person.region_code == "310000"
    assert {c.bank_code for c in zhang.cards} == {"ICBC", "CMB", "CCB"}
    assert any(c.bank_code == "CMB" and c.status == "dormant" for c in zhang.cards)
    assert any(c.bank_code == "CCB" and c.card_type == "credit" for c in zhang.cards)
    assert by_name["李娜"].person.region_code == "530000"
    wang = by_name["王芳"].person
    assert REGIONS_BY_CODE[wang.region_code].pilot_open_date is None  # a region not yet open
    heavy = by_name["刘洋"]
    assert Counter(c.bank_code for c in heavy.cards)["ICBC"] == 55
    assert by_name["陈静"].cards == ()


def test_demo_ids_never_collide_with_the_stream(population: list[tuple[Person, list[Card]]]) -> None:
    demo_ids = {d.person.resident_id_number for d in DEMO_PEOPLE}
    demo_numbers = {c.number for d in DEMO_PEOPLE for c in d.cards}
    for person, cards in population:
        if person.index >= len(DEMO_PEOPLE):
            assert person.resident_id_number not in demo_ids
            # Stream sequences are 001-989; 990-999 belong to the demo people.
            assert int(person.resident_id_number[14:17]) < 990
            assert not demo_numbers.intersection(c.number for c in cards)


def test_demo_balances() -> None:
    """The fixed balances behind the bank's demo closure decisions (see the generator's docstring)."""
    by_name = {d.person.name: d for d in DEMO_PEOPLE}
    zhang = [(c.bank_code, c.card_type, c.status, c.balance_cents) for c in by_name["张伟"].cards]
    assert zhang == [
        ("ICBC", "debit", "active", 0),
        ("ICBC", "credit", "active", 328_000),
        ("ICBC", "debit", "closed", 0),
        ("CMB", "debit", "active", 5_200_000),
        ("CMB", "debit", "dormant", 0),
        ("CCB", "credit", "active", 0),
    ]
    assert [c.balance_cents for c in by_name["李娜"].cards] == [125_050, 0, 8_600, 0]
    assert [c.balance_cents for c in by_name["王芳"].cards] == [1_800_000, 45_600]
    heavy = by_name["刘洋"].cards
    assert [c.status for c in heavy].count("frozen") == 3
    assert all(c.balance_cents >= 0 for c in heavy)
    assert any(c.balance_cents == 0 for c in heavy)
    assert any(c.balance_cents > 0 for c in heavy)


def test_random_balances_are_plausible(population: list[tuple[Person, list[Card]]]) -> None:
    held: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for person, cards in population:
        if person.index < len(DEMO_PEOPLE):
            continue
        for card in cards:
            assert 0 <= card.balance_cents <= 5_000_000, card
            if card.status == "closed":
                assert card.balance_cents == 0
                continue
            kind = (
                "dormant debit" if card.card_type == "debit" and card.status == "dormant" else card.card_type
            )
            total[kind] += 1
            held[kind] += card.balance_cents > 0
    assert 0.55 < held["debit"] / total["debit"] < 0.65
    assert 0.35 < held["credit"] / total["credit"] < 0.45
    assert held["dormant debit"] / total["dormant debit"] < 0.3  # mostly empty
    # Amounts spread over orders of magnitude, from small change to tens of thousands of yuan.
    amounts = [c.balance_cents for _, cards in population for c in cards if c.balance_cents]
    assert min(amounts) < 10_000 < 1_000_000 < max(amounts)
