"""Domain → cardlookup.v1 conversion: the fast paths give what protobuf's own helpers give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from server.union.api import convert
from server.union.domain import model

_ZONES = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-3, minutes=-30))]
)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=_ZONES))
def test_timestamp_is_exactly_what_from_datetime_gives(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value)  # naive means UTC there, and in convert.timestamp
    assert convert.timestamp(value) == expected


def _lookup(banks: list[model.BankProgress]) -> model.Lookup:
    now = datetime(2026, 11, 27, 8, 30, 15, 123456, tzinfo=UTC)
    return model.Lookup("l1", model.LookupState.RUNNING, now, now + timedelta(hours=24), None, banks)


def test_lookup_progress_is_converted_field_by_field_and_never_shared() -> None:
    answered = model.BankProgress("ICBC", "工商银行", model.BankOutcome.ANSWERED, 2, 3, 2, 1, "")
    failed = model.BankProgress("CMB", "招商银行", model.BankOutcome.FAILED, 5, 0, 0, 0, "bank call failed")
    first = convert.lookup(_lookup([answered, failed]))
    assert [
        (p.bank_code, p.bank_name, p.outcome, p.attempt_count, p.card_count, p.failure_reason)
        for p in first.bank_progress
    ] == [
        ("ICBC", "工商银行", convert.pb.BANK_OUTCOME_ANSWERED, 2, 3, ""),
        ("CMB", "招商银行", convert.pb.BANK_OUTCOME_FAILED, 5, 0, "bank call failed"),
    ]
    # A converted message is the caller's own: changing it does not change the next conversion.
    first.bank_progress[0].card_count = 99
    assert convert.lookup(_lookup([answered])).bank_progress[0].card_count == 3
