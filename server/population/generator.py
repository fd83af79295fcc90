"""Deterministic synthetic population: people and the bank cards they hold.

The union's identity registry and every simulated bank derive their data from
the same `(seed, size)`, so a person verified by the union really does hold the
cards the banks report, without any shared database between them.

Everything is a pure function of `(seed, index)`: `person_at` and `cards_of`
seed a private `random.Random` from a SHA-256 of the inputs, so any process
can regenerate any person without generating the ones before it, and
`people()` streams a population of a million without holding it in memory.

Uniqueness does not rely on luck:
- A resident ID number's birth date and 3-digit sequence come from an affine
  permutation of the index over (days in 1950..2006) x 989 sequences (001-989),
  so no two indices below ~20.5 million share them, whatever the area code.
- A mobile number's last 8 digits are an affine permutation of the index.
- A card number's last 9 digits before the check digit are a permutation of
  `index * 100 + ordinal` (unique per card for indices below 10 million).

Demo people (fixed, not random) take indices 0..len(DEMO_PEOPLE)-1 of every
population. Their sequence digits are 990-999, which the random stream never
uses, so they cannot collide with anyone (their balances are listed below):

=====  ======  ====================  ==============  ===========================================
index  name    resident ID number    region          cards (non-closed are reported)
=====  ======  ====================  ==============  ===========================================
0      张伟    310104198503129915    上海 (open)      ICBC debit+credit, ICBC closed debit,
                                                     CMB debit + dormant debit, CCB credit
1      李娜    530102199007219922    云南 (open)      BOC debit, ABC debit, PSBC debit, CMB credit
2      王芳    440104197811059941    广东 (closed)    ICBC debit, CGB credit (region refusal demo)
3      刘洋    110105198201309952    北京 (open)      55 cards at ICBC (heavy holder), 1 at CMB
4      陈静    330106199509099965    浙江 (open)      no cards anywhere
=====  ======  ====================  ==============  ===========================================

Dates are relative to the fixed `REFERENCE_DATE` (2026-01-01) so output never
depends on when it is generated; a dormant card has had no activity for more
than a year before it.

Balances (`Card.balance_cents`, in fen): for a debit card the funds it holds, for
a credit card the outstanding balance owed. Random people's balances are drawn
from their per-person card RNG *after* every other draw, so adding them changed
no card number, status or date. About 60% of open debit cards hold funds
(log-uniform ¥0.01-¥50,000), dormant debit cards mostly hold nothing (80%) or
small change, and about 40% of open credit cards carry an outstanding balance
(log-uniform ¥1-¥50,000); closed cards hold nothing. The demo people's balances
are fixed, so the bank's closure decisions (server.bank.actions) are
predictable:

======  =====  ======  =======  ====  ===============  =================================
person  bank   type    status   last  balance          CloseCard outcome
======  =====  ======  =======  ====  ===============  =================================
张伟    ICBC   debit   active   1472  ¥0               CLOSED
张伟    ICBC   credit  active   2353  ¥3,280.00 owed   BRANCH_VISIT_REQUIRED
张伟    ICBC   debit   closed   7090  ¥0               CLOSED ("already closed")
张伟    CMB    debit   active   3666  ¥52,000.00       BRANCH_VISIT_REQUIRED
张伟    CMB    debit   dormant  2844  ¥0               CLOSED
张伟    CCB    credit  active   0918  ¥0               SCHEDULED
李娜    BOC    debit   active   6389  ¥1,250.50        BRANCH_VISIT_REQUIRED
李娜    ABC    debit   active   9403  ¥0               CLOSED
李娜    PSBC   debit   active   5456  ¥86.00           BRANCH_VISIT_REQUIRED
李娜    CMB    credit  active   9126  ¥0               SCHEDULED
王芳    ICBC   debit   active   3472  ¥18,000.00       BRANCH_VISIT_REQUIRED
王芳    CGB    credit  active   3887  ¥456.00 owed     BRANCH_VISIT_REQUIRED
刘洋    ICBC   55      mixed          see below        frozen: REJECTED (see below)
刘洋    CMB    credit  active   6360  ¥0               SCHEDULED
======  =====  ======  =======  ====  ===============  =================================

陈静 holds no cards, so every CloseCard/ReportCardNotMine for her is NOT_FOUND.

刘洋's 55 ICBC cards (n = 0..54, see `_heavy_demo_cards`): every third card
(n % 3 == 0) holds nothing, the others ¥100 x (n % 7 + 1). The frozen debit
cards (n = 7, 27, 47; last four 5371, 2775, 0176) are REJECTED whatever their
balance; the active credit cards n = 0 (0031) and 33 (5996) owe nothing
(SCHEDULED), n = 11 (1058) and 44 (5350) owe ¥500 and ¥300 (BRANCH_VISIT_REQUIRED).

Longer than most modules (~630 lines): the population, its cards and the demo people are one
set of guarantees (the uniqueness above), kept in one place.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import struct
from bisect import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

from server.common.checks import luhn_check_digit, resident_id_check_char
from server.population.catalogue import BANKS, BANKS_BY_CODE, BankInfo, Bin

REFERENCE_DATE = date(2026, 1, 1)
DORMANCY = timedelta(days=365)

_BIRTH_FIRST = date(1950, 1, 1)
_BIRTH_LAST = date(2006, 12, 31)
_BIRTH_DAYS = (_BIRTH_LAST - _BIRTH_FIRST).days + 1
_STREAM_SEQUENCES = 989  # sequences 001..989; 990..999 are reserved for the demo people
_ID_SLOTS = _BIRTH_DAYS * _STREAM_SEQUENCES
_MOBILE_SLOTS = 10**8
_CARD_BODY_SLOTS = 10**9
_MAX_CARDS_PER_PERSON = 100  # `index * 100 + ordinal` must stay unique


def _cumulative(weights: Sequence[float]) -> tuple[float, ...]:
    total = sum(weights)
    running = 0.0
    result: list[float] = []
    for weight in weights:
        running += weight
        result.append(running / total)
    return tuple(result)


# Real county-level area codes (GB/T 2260) per province, so ID numbers look right.
_AREA_CODES: dict[str, tuple[str, ...]] = {
    "110000": ("110101", "110102", "110105", "110106", "110108", "110114"),
    "120000": ("120101", "120103", "120104", "120116"),
    "130000": ("130102", "130104", "130203", "130602"),
    "140000": ("140105", "140106", "140107", "140202"),
    "150000": ("150102", "150103", "150203"),
    "210000": ("210102", "210103", "210202", "210204"),
    "220000": ("220102", "220103", "220104", "220202"),
    "230000": ("230102", "230103", "230104", "230202"),
    "310000": ("310101", "310104", "310105", "310106", "310107", "310110", "310112", "310115"),
    "320000": ("320102", "320104", "320106", "320505", "320211"),
    "330000": ("330102", "330105", "330106", "330108", "330203", "330302"),
    "340000": ("340102", "340103", "340104", "340202"),
    "350000": ("350102", "350103", "350203", "350206"),
    "360000": ("360102", "360103", "360104"),
    "370000": ("370102", "370103", "370202", "370203"),
    "410000": ("410102", "410103", "410105", "410302"),
    "420000": ("420102", "420103", "420106", "420111"),
    "430000": ("430102", "430103", "430104", "430105"),
    "440000": ("440103", "440104", "440106", "440303", "440304", "440305"),
    "450000": ("450102", "450103", "450302"),
    "460000": ("460105", "460106", "460107", "460202"),
    "500000": ("500101", "500103", "500105", "500106", "500112"),
    "510000": ("510104", "510105", "510106", "510107"),
    "520000": ("520102", "520103", "520111", "520302"),
    "530000": ("530102", "530103", "530111", "530112", "530302"),
    "540000": ("540102", "540103"),
    "610000": ("610102", "610103", "610104", "610113"),
    "620000": ("620102", "620103", "620104"),
    "630000": ("630102", "630103", "630104"),
    "640000": ("640104", "640105", "640106"),
    "650000": ("650102", "650103", "650104", "650105"),
}
_PILOT_REGIONS = frozenset(
    {
        "310000",
        "530000",
        "110000",
        "500000",
        "520000",
        "220000",
        "650000",
        "610000",
        "350000",
        "430000",
        "140000",
        "330000",
        "410000",
        "340000",
        "230000",
        "460000",
    }
)
# Most generated people live in the pilot regions (they are the ones who can use the
# service), but a quarter live elsewhere so region gating has something to refuse.
_REGION_CODES: tuple[str, ...] = tuple(_AREA_CODES)
_REGION_CUMULATIVE = _cumulative(
    [
        0.75 / len(_PILOT_REGIONS)
        if code in _PILOT_REGIONS
        else 0.25 / (len(_AREA_CODES) - len(_PILOT_REGIONS))
        for code in _REGION_CODES
    ]
)

# The most common surnames, roughly by frequency.
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
)
_SURNAME_CUMULATIVE = _cumulative([max(1.0, 7.5 - 0.3 * i) for i in range(len(_SURNAMES))])
_MALE_CHARS = "伟强磊军洋勇杰涛明超刚平辉鹏华飞鑫波斌宇浩凯健俊帆帅旭宁龙林欢阳建国志文博"
_FEMALE_CHARS = "芳娜敏静丽艳娟霞秀英玲桂兰燕红梅琳莉雪慧婷颖倩洁琴云萍佳欣怡晶蕾"
_MOBILE_PREFIXES = (
    "130",
    "131",
    "132",
    "133",
    "134",
    "135",
    "136",
    "137",
    "138",
    "139",
    "150",
    "151",
    "152",
    "153",
    "155",
    "156",
    "157",
    "158",
    "159",
    "180",
    "181",
    "182",
    "183",
    "184",
    "185",
    "186",
    "187",
    "188",
    "189",
    "191",
    "193",
    "195",
    "196",
    "198",
    "199",
)

# The big state banks hold most accounts; joint-stock banks fewer.
_BANK_WEIGHTS: dict[str, float] = {
    "ICBC": 14,
    "ABC": 12,
    "CCB": 12,
    "BOC": 10,
    "PSBC": 9,
    "BOCOM": 7,
    "CMB": 9,
    "CITIC": 4,
    "CEB": 3,
    "SPDB": 4,
    "CMBC": 3,
    "HXB": 2,
    "PAB": 4,
    "CIB": 4,
    "CGB": 2,
    "CZB": 1,
}
_BANK_CODES: tuple[str, ...] = tuple(bank.code for bank in BANKS)
_BANK_CUMULATIVE = _cumulative([_BANK_WEIGHTS[code] for code in _BANK_CODES])
_BANKS_PER_PERSON_CUMULATIVE = _cumulative([35, 30, 18, 11, 6])  # P(1 bank), P(2 banks), ...
NO_CARD_RATE = 0.08
HEAVY_HOLDER_RATE = 1 / 500
CREDIT_RATE = 0.3


@dataclass(frozen=True)
class Person:
    index: int
    resident_id_number: str
    name: str
    mobile_number: str
    region_code: str  # province code, e.g. "310000"


@dataclass(frozen=True)
class Card:
    bank_code: str
    number: str
    card_type: str  # "debit" | "credit"
    status: str  # "active" | "dormant" | "frozen" | "closed"
    open_date: date
    last_activity_date: date
    # Fen (1/100 yuan): funds held on a debit card, the outstanding balance owed on a credit card.
    balance_cents: int = 0


@dataclass(frozen=True)
class DemoPerson:
    person: Person
    cards: tuple[Card, ...]


def _draws(seed: int, index: int, purpose: str) -> tuple[float, ...]:
    """Eight uniform floats in [0, 1) from one hash: cheaper than seeding a Random per person."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{index}".encode(), digest_size=32).digest()
    return tuple(value / 2**32 for value in struct.unpack(">8I", digest))


def _pick(sequence: Sequence[str], draw: float) -> str:
    return sequence[int(draw * len(sequence))]


def _weighted(sequence: Sequence[str], cumulative: Sequence[float], draw: float) -> str:
    return sequence[min(bisect(cumulative, draw), len(sequence) - 1)]


def _rng(seed: int, index: int, purpose: str) -> random.Random:
    digest = hashlib.sha256(f"{purpose}:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))  # noqa: S311 - synthetic data, not secrets


def _coprime_multiplier(modulus: int, label: str) -> int:
    """A large multiplier coprime to `modulus`, so `a * i + b mod modulus` is a permutation."""
    candidate = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "big") % modulus
    while candidate < 2 or math.gcd(candidate, modulus) != 1:
        candidate = (candidate + 1) % modulus
    return candidate


@functools.cache
def _permutation(modulus: int, label: str) -> tuple[int, int]:
    offset = int.from_bytes(hashlib.sha256(f"offset:{label}".encode()).digest()[:8], "big") % modulus
    return _coprime_multiplier(modulus, label), offset


def _permute(value: int, modulus: int, label: str) -> int:
    multiplier, offset = _permutation(modulus, label)
    return (multiplier * value + offset) % modulus


def make_resident_id(area_code: str, birth_date: date, sequence: int) -> str:
    """An 18-character GB 11643 resident ID number with its check character."""
    first17 = f"{area_code}{birth_date.year:04d}{birth_date.month:02d}{birth_date.day:02d}{sequence:03d}"
    return first17 + resident_id_check_char(first17)


def birth_date_of(resident_id_number: str) -> date:
    value = resident_id_number
    return date(int(value[6:10]), int(value[10:12]), int(value[12:14]))


def card_number(bin_: Bin, index: int, ordinal: int) -> str:
    """The Luhn-valid card number for a person's `ordinal`-th card under `bin_`.

    The last 9 body digits are a permutation of `index * 100 + ordinal`, which makes
    every (BIN, person, ordinal) a distinct number; longer numbers get filler digits.
    """
    if not 0 <= ordinal < _MAX_CARDS_PER_PERSON:
        raise ValueError(f"ordinal {ordinal} out of range")
    body = _permute(index * _MAX_CARDS_PER_PERSON + ordinal, _CARD_BODY_SLOTS, f"card:{bin_.prefix}")
    filler_length = bin_.length - len(bin_.prefix) - 9 - 1
    filler = ""
    if filler_length > 0:
        filler = f"{(body * 7919 + index) % 10**filler_length:0{filler_length}d}"
    partial = f"{bin_.prefix}{filler}{body:09d}"
    return partial + luhn_check_digit(partial)


# --- demo people -------------------------------------------------------------------------


_DemoCardSpec = tuple[str, str, str, date, date, int]  # bank, type, status, opened, last activity, balance


def _demo_card(
    index: int,
    ordinal: int,
    bank_code: str,
    card_type: str,
    status: str,
    opened: date,
    last_activity: date,
    balance_cents: int,
) -> Card:
    bank = BANKS_BY_CODE[bank_code]
    bins = bank.debit_bins if card_type == "debit" else bank.credit_bins
    return Card(
        bank_code=bank_code,
        number=card_number(bins[ordinal % len(bins)], index, ordinal),
        card_type=card_type,
        status=status,
        open_date=opened,
        last_activity_date=last_activity,
        balance_cents=balance_cents,
    )


def _demo(
    index: int,
    name: str,
    area_code: str,
    birth: date,
    sequence: int,
    mobile: str,
    cards: Sequence[_DemoCardSpec],
) -> DemoPerson:
    person = Person(
        index=index,
        resident_id_number=make_resident_id(area_code, birth, sequence),
        name=name,
        mobile_number=mobile,
        region_code=area_code[:2] + "0000",
    )
    return DemoPerson(
        person=person,
        cards=tuple(_demo_card(index, ordinal, *spec) for ordinal, spec in enumerate(cards)),
    )


def _heavy_demo_cards() -> list[_DemoCardSpec]:
    specs: list[_DemoCardSpec] = []
    for n in range(55):
        opened = date(2008, 1, 15) + timedelta(days=61 * n)
        balance = 0 if n % 3 == 0 else 10_000 * (n % 7 + 1)
        # Mostly active salary/payment cards; every 9th forgotten (dormant), every 20th frozen.
        if n % 9 == 4:
            specs.append(("ICBC", "debit", "dormant", opened, opened + timedelta(days=30), balance))
        elif n % 20 == 7:
            specs.append(("ICBC", "debit", "frozen", opened, date(2025, 6, 1), balance))
        else:
            card_type = "credit" if n % 11 == 0 else "debit"
            last = date(2025, 12, 1) - timedelta(days=n)
            specs.append(("ICBC", card_type, "active", opened, last, balance))
    specs.append(("CMB", "credit", "active", date(2019, 5, 20), date(2025, 12, 28), 0))
    return specs


DEMO_PEOPLE: tuple[DemoPerson, ...] = (
    _demo(
        0,
        "张伟",
        "310104",
        date(1985, 3, 12),
        991,
        "13917285036",
        [
            ("ICBC", "debit", "active", date(2007, 9, 3), date(2025, 12, 20), 0),
            ("ICBC", "credit", "active", date(2015, 4, 18), date(2025, 12, 30), 328_000),
            ("ICBC", "debit", "closed", date(2009, 2, 1), date(2016, 8, 8), 0),
            ("CMB", "debit", "active", date(2012, 6, 11), date(2025, 11, 2), 5_200_000),
            ("CMB", "debit", "dormant", date(2010, 3, 5), date(2019, 7, 14), 0),
            ("CCB", "credit", "active", date(2018, 10, 9), date(2025, 12, 12), 0),
        ],
    ),
    _demo(
        1,
        "李娜",
        "530102",
        date(1990, 7, 21),
        992,
        "15887123490",
        [
            ("BOC", "debit", "active", date(2012, 9, 1), date(2025, 12, 1), 125_050),
            ("ABC", "debit", "active", date(2008, 7, 30), date(2025, 10, 17), 0),
            ("PSBC", "debit", "active", date(2014, 3, 3), date(2025, 9, 9), 8_600),
            ("CMB", "credit", "active", date(2020, 1, 6), date(2025, 12, 24), 0),
        ],
    ),
    _demo(
        2,
        "王芳",
        "440104",
        date(1978, 11, 5),
        994,
        "18620345871",
        [
            ("ICBC", "debit", "active", date(2001, 5, 14), date(2025, 12, 5), 1_800_000),
            ("CGB", "credit", "active", date(2016, 11, 23), date(2025, 12, 18), 45_600),
        ],
    ),
    _demo(3, "刘洋", "110105", date(1982, 1, 30), 995, "13501234567", _heavy_demo_cards()),
    _demo(4, "陈静", "330106", date(1995, 9, 9), 996, "19957081234", []),
)
_DEMO_BY_INDEX: dict[int, DemoPerson] = {demo.person.index: demo for demo in DEMO_PEOPLE}


# --- the random stream -------------------------------------------------------------------


def person_at(seed: int, index: int) -> Person:
    """The person at `index` of the population made from `seed` (a pure function)."""
    if index < 0:
        raise ValueError("index must be non-negative")
    demo = _DEMO_BY_INDEX.get(index)
    if demo is not None:
        return demo.person
    if index >= _ID_SLOTS:
        raise ValueError(f"index {index} beyond the {_ID_SLOTS} unique identities")
    draws = _draws(seed, index, "person")
    region_code = _weighted(_REGION_CODES, _REGION_CUMULATIVE, draws[0])
    area_code = _pick(_AREA_CODES[region_code], draws[1])
    slot = _permute(index, _ID_SLOTS, f"id:{seed}")
    birth = _BIRTH_FIRST + timedelta(days=slot // _STREAM_SEQUENCES)
    sequence = slot % _STREAM_SEQUENCES + 1
    # GB 11643: an odd sequence number is a man, even a woman; give a name to match.
    given_chars = _MALE_CHARS if sequence % 2 else _FEMALE_CHARS
    given = _pick(given_chars, draws[2])
    if draws[3] >= 0.3:
        given += _pick(given_chars, draws[4])
    surname = _weighted(_SURNAMES, _SURNAME_CUMULATIVE, draws[5])
    mobile_tail = _permute(index, _MOBILE_SLOTS, f"mobile:{seed}")
    return Person(
        index=index,
        resident_id_number=make_resident_id(area_code, birth, sequence),
        name=surname + given,
        mobile_number=f"{_pick(_MOBILE_PREFIXES, draws[6])}{mobile_tail:08d}",
        region_code=region_code,
    )


def people(seed: int, size: int) -> Iterator[Person]:
    """Stream the population's `size` people, demo people first."""
    for index in range(size):
        yield person_at(seed, index)


def _card_dates(rng: random.Random, birth: date) -> tuple[date, date, str]:
    """Open date, last activity and status for one random card."""
    earliest = max(date(birth.year + 18, birth.month, min(birth.day, 28)), date(1998, 1, 1))
    latest = REFERENCE_DATE - timedelta(days=30)
    opened = earliest + timedelta(days=rng.randrange(max(1, (latest - earliest).days)))
    roll = rng.random()
    dormant_before = REFERENCE_DATE - DORMANCY
    if 0.80 <= roll < 0.90 and opened < dormant_before - timedelta(days=1):
        last = opened + timedelta(days=rng.randrange((dormant_before - opened).days))
        return opened, last, "dormant"
    recent_from = max(opened, dormant_before + timedelta(days=1))
    last = recent_from + timedelta(days=rng.randrange(max(1, (REFERENCE_DATE - recent_from).days)))
    if 0.90 <= roll < 0.94:
        return opened, last, "frozen"
    if roll >= 0.94:
        return opened, min(last, opened + timedelta(days=rng.randrange(30, 3000))), "closed"
    return opened, last, "active"


def cards_of(seed: int, person: Person) -> list[Card]:
    """Every card (closed ones included) this person holds at any bank."""
    demo = _DEMO_BY_INDEX.get(person.index)
    if demo is not None and demo.person == person:
        return list(demo.cards)
    rng = _rng(seed, person.index, "cards")
    if rng.random() < NO_CARD_RATE:
        return []
    birth = birth_date_of(person.resident_id_number)
    bank_count = 1 + bisect(_BANKS_PER_PERSON_CUMULATIVE, rng.random())
    banks: list[str] = []
    while len(banks) < bank_count:
        code = _weighted(_BANK_CODES, _BANK_CUMULATIVE, rng.random())
        if code not in banks:
            banks.append(code)
    plan: list[tuple[str, int]] = [(code, 1 if rng.random() < 0.8 else 2) for code in banks]
    if rng.random() < HEAVY_HOLDER_RATE:
        # A heavy holder: dozens of cards at one bank (a payroll agent, or a fraud victim).
        plan[0] = (plan[0][0], rng.randrange(50, 71))
    drawn: list[tuple[str, str, str, date, date, str]] = []  # bank, number, type, opened, last, status
    for bank_code, count in plan:
        bank = BANKS_BY_CODE[bank_code]
        for _ in range(count):
            card_type = "credit" if rng.random() < CREDIT_RATE else "debit"
            bins = bank.credit_bins if card_type == "credit" else bank.debit_bins
            opened, last, status = _card_dates(rng, birth)
            number = card_number(rng.choice(bins), person.index, len(drawn))
            drawn.append((bank_code, number, card_type, opened, last, status))
    # Balances are drawn last, so they leave every earlier draw (numbers, statuses, dates) as it was.
    return [
        Card(
            bank_code=bank_code,
            number=number,
            card_type=card_type,
            status=status,
            open_date=opened,
            last_activity_date=last,
            balance_cents=_random_balance(rng, card_type, status),
        )
        for bank_code, number, card_type, opened, last, status in drawn
    ]


_LOG_1 = 0.0
_LOG_100 = math.log(100)
_LOG_50K_YUAN = math.log(5_000_001)
_LOG_500_YUAN = math.log(50_001)


def _log_uniform_cents(rng: random.Random, log_low: float, log_high: float, high_cents: int) -> int:
    """An amount whose order of magnitude is uniform between exp(log_low) and high (small sums common)."""
    return min(high_cents, int(math.exp(rng.uniform(log_low, log_high))))


def _random_balance(rng: random.Random, card_type: str, status: str) -> int:
    """Funds on a debit card, the amount owed on a credit card (fen); one draw, then maybe one more."""
    roll = rng.random()
    if status == "closed":
        return 0
    if card_type == "credit":  # up to ¥50,000 owed by 40%
        return _log_uniform_cents(rng, _LOG_100, _LOG_50K_YUAN, 5_000_000) if roll < 0.4 else 0
    if status == "dormant":  # small change on 20%
        return _log_uniform_cents(rng, _LOG_1, _LOG_500_YUAN, 50_000) if roll < 0.2 else 0
    return _log_uniform_cents(rng, _LOG_1, _LOG_50K_YUAN, 5_000_000) if roll < 0.6 else 0


# Of the people with cards, the share who bank with a bank that joins after the first 16 (a city
# commercial bank: fewer customers than a national one).
JOINING_BANK_HOLDER_RATE = 0.12


def cards_at_joining_bank(seed: int, person: Person, bank: BankInfo) -> list[Card]:
    """The cards this person holds at a bank outside the built-in 16 (one that joins later, with
    the BINs its configuration gives): a pure function of (seed, person, bank code), like
    `cards_of`, so the bank's store and the union's registry agree without sharing anything.
    Demo people hold none (their cards are the fixed ones above); none are closed."""
    if person.index in _DEMO_BY_INDEX or bank.code in BANKS_BY_CODE:
        return []
    rng = _rng(seed, person.index, f"joining:{bank.code}")
    if rng.random() >= JOINING_BANK_HOLDER_RATE:
        return []
    birth = birth_date_of(person.resident_id_number)
    cards = []
    for ordinal in range(1 if rng.random() < 0.8 else 2):
        card_type = "credit" if rng.random() < CREDIT_RATE and bank.credit_bins else "debit"
        bins = bank.credit_bins if card_type == "credit" else bank.debit_bins
        opened, last, status = _card_dates(rng, birth)
        cards.append(
            Card(
                bank_code=bank.code,
                number=card_number(rng.choice(bins), person.index, ordinal),
                card_type=card_type,
                status="active" if status == "closed" else status,
                open_date=opened,
                last_activity_date=last,
                balance_cents=_random_balance(rng, card_type, status),
            )
        )
    return cards


def cards_at_bank(seed: int, person: Person, bank_code: str) -> list[Card]:
    """The cards this person holds at one bank."""
    return [card for card in cards_of(seed, person) if card.bank_code == bank_code]
