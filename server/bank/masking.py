"""Masking at the source: a stored card becomes a bankquery.v1 CardRecord.

This is the only place a bank turns its own card rows into contract messages,
and it copies just the first 4 and last 4 digits and the length, so the full
number can never reach a proto field (design invariant 1).
"""

from __future__ import annotations

from datetime import datetime, time
from zoneinfo import ZoneInfo

from bankquery.v1 import bank_query_service_pb2 as pb
from google.protobuf import timestamp_pb2

from server.bank.store import StoredCard

# Banks book card openings on Beijing time; the open date is that day's midnight there.
BANK_TIMEZONE = ZoneInfo("Asia/Shanghai")

_CARD_TYPES: dict[str, pb.CardType.ValueType] = {
    "debit": pb.CARD_TYPE_DEBIT,
    "credit": pb.CARD_TYPE_CREDIT,
}
_CARD_STATUSES: dict[str, pb.CardStatus.ValueType] = {
    "active": pb.CARD_STATUS_ACTIVE,
    "dormant": pb.CARD_STATUS_DORMANT,
    "frozen": pb.CARD_STATUS_FROZEN,
}


def mask_number(number: str) -> str:
    """Human-readable masked form for operator tools, e.g. '6222 **** 1234'."""
    return f"{number[:4]} **** {number[-4:]}"


def to_card_record(bank_code: str, card: StoredCard) -> pb.CardRecord:
    """The contract form of one card; closed cards are never reported."""
    if card.status not in _CARD_STATUSES:
        raise ValueError(f"card status {card.status!r} is not reportable")
    open_time = timestamp_pb2.Timestamp()
    open_time.FromDatetime(datetime.combine(card.open_date, time.min, tzinfo=BANK_TIMEZONE))
    return pb.CardRecord(
        bank_code=bank_code,
        card_ref=card.card_ref,
        card_type=_CARD_TYPES[card.card_type],
        first_four=card.number[:4],
        last_four=card.number[-4:],
        number_length=len(card.number),
        status=_CARD_STATUSES[card.status],
        open_time=open_time,
    )
