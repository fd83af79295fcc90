"""A lookup end to end: real union, real banks, real sockets, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from cardlookup.v1 import card_lookup_service_pb2 as pb

from clients.client import TERMS_VERSION, CardLookupError
from server.bank.bank_server import RunningBank
from server.bank.store import StoredCard
from server.population.generator import DEMO_PEOPLE
from server.union.union_server import UnionServer
from tests.conftest import LI, LIU, ZHANG, UnionFactory, run_lookup, verified_client

SHANGHAI = ZoneInfo("Asia/Shanghai")
MASKED = re.compile(r"^\d{4}( \*{1,4})+ \d{4}$")


async def test_report_for_seeded_person(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)

    # Watch: current state first, then bank events, ending with report_ready.
    assert events[0].lookup.state in (pb.LOOKUP_STATE_RUNNING, pb.LOOKUP_STATE_COMPLETED)
    assert events[-1].lookup.state == pb.LOOKUP_STATE_COMPLETED
    summaries = {s.bank_code: s for s in report.bank_summaries}
    assert len(summaries) == 16
    assert all(s.outcome == pb.BANK_OUTCOME_ANSWERED for s in summaries.values())
    assert (summaries["ICBC"].debit_card_count, summaries["ICBC"].credit_card_count) == (
        1,
        1,
    )  # closed card left out
    assert (summaries["CMB"].debit_card_count, summaries["CMB"].credit_card_count) == (2, 0)
    assert (summaries["CCB"].debit_card_count, summaries["CCB"].credit_card_count) == (0, 1)
    assert (report.total_card_count, report.total_debit_card_count, report.total_credit_card_count) == (
        5,
        3,
        2,
    )
    assert [c.status for c in report.cards].count(pb.CARD_STATUS_DORMANT) == 1
    for card in report.cards:
        assert MASKED.match(card.masked_number), card.masked_number
        assert len(card.masked_number.replace(" ", "")) == card.number_length
        assert card.card_ref
        assert card.bank_name
    # When each card was opened, as its bank said: the day's start in the bank's time zone.
    opened = {(c.bank_code, c.number[-4:]): c.open_date for c in DEMO_PEOPLE[0].cards if c.status != "closed"}
    assert {
        (c.bank_code, c.masked_number[-4:]): c.open_time.ToDatetime(tzinfo=SHANGHAI).date()
        for c in report.cards
    } == opened
    assert all(c.open_time.ToDatetime(tzinfo=SHANGHAI).hour == 0 for c in report.cards)
    # The report expires at the end of the 7th natural day (Asia/Shanghai midnight = 16:00 UTC).
    assert report.expire_time.ToDatetime().hour == 16
    assert (report.expire_time.ToDatetime() - report.generate_time.ToDatetime()).days in (7, 8)


@contextmanager
def banks_held(banks: dict[str, RunningBank]) -> Iterator[threading.Event]:
    """Every bank's card reads wait (in a worker thread) until the event is set: a lookup stays
    RUNNING, with no bank answered, for as long as the test needs."""
    released = threading.Event()
    restore = []
    for bank in banks.values():
        real = bank.store.find_cards_many

        def held(asked: Sequence[tuple[str, str]], real: object = real) -> list[list[StoredCard]]:
            released.wait(timeout=30)
            return real(asked)  # type: ignore[operator]

        restore.append((bank, real, bank.servicer.inline_read_limit))
        bank.servicer.inline_read_limit = 0
        bank.store.find_cards_many = held  # type: ignore[method-assign]
    try:
        yield released
    finally:
        released.set()
        for bank, real, limit in restore:
            bank.store.find_cards_many = real  # type: ignore[method-assign]
            bank.servicer.inline_read_limit = limit


@pytest.mark.parametrize("grouped", [False, True])
async def test_watch_reports_every_bank_change_one_by_one_or_grouped(
    union: UnionServer, banks: dict[str, RunningBank], grouped: bool
) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        with banks_held(banks) as released:
            lookup = await client.create_lookup(
                request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION
            )
            watch = aiter(client.watch_lookup(lookup.name, stream_timeout=60, group_bank_changes=grouped))
            first = await anext(watch)
            released.set()  # only now can any bank answer: every answer is a change this watch sees
            events = [first, *[event async for event in watch]]
    assert first.lookup.state == pb.LOOKUP_STATE_RUNNING
    assert (first.bank_code, list(first.bank_codes), first.report_ready) == ("", [], False)
    last = events[-1]
    assert last.report_ready
    assert (last.bank_code, list(last.bank_codes)) == ("", [])
    changes = events[1:-1]
    assert changes
    order = [progress.bank_code for progress in last.lookup.bank_progress]
    for event in changes:
        assert event.bank_codes
        assert event.bank_code == event.bank_codes[0]
        assert sorted(event.bank_codes, key=order.index) == list(event.bank_codes)  # the lookup's order
        assert len(set(event.bank_codes)) == len(event.bank_codes)
        if not grouped:
            assert list(event.bank_codes) == [event.bank_code]
    # Every bank answered after the watch began, so every bank's change was reported.
    assert {code for event in changes for code in event.bank_codes} == set(order)
    assert len(order) == 16
    # (How many messages a grouped watch saves depends on how close together the answers land: a
    # matter for the benchmark, not for a test.)


async def test_heavy_holder_gets_every_card(union: UnionServer) -> None:
    client = await verified_client(union, LIU)
    async with client:
        _, report = await run_lookup(client)
    icbc = next(s for s in report.bank_summaries if s.bank_code == "ICBC")
    assert icbc.debit_card_count + icbc.credit_card_count == 55


async def test_create_is_idempotent_and_rate_limited(union: UnionServer) -> None:
    client = await verified_client(union, LI)
    async with client:
        request_id = uuid.uuid4().hex
        first = await client.create_lookup(request_id=request_id, consent_terms_version=TERMS_VERSION)
        again = await client.create_lookup(request_id=request_id, consent_terms_version=TERMS_VERSION)
        assert again.name == first.name

        _, report = await run_lookup(client, request_id=request_id)
        assert report.lookup == first.name

        # A new request inside the 7-day cooldown: RESOURCE_EXHAUSTED with RetryInfo.
        with pytest.raises(CardLookupError) as refused:
            await client.create_lookup(request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.reason == "REQUERY_COOLDOWN"
        assert refused.value.retry_after is not None
        assert refused.value.retry_after.days >= 6

        # The same request_id still answers with the original lookup.
        assert (
            await client.create_lookup(request_id=request_id, consent_terms_version=TERMS_VERSION)
        ).name == first.name


async def test_second_lookup_while_one_is_running(make_union: UnionFactory) -> None:
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        # Pause the orchestrator so the first lookup is certainly in flight.
        await union.orchestrator.stop(0)
        await client.create_lookup(request_id="first", consent_terms_version=TERMS_VERSION)
        with pytest.raises(CardLookupError) as refused:
            await client.create_lookup(request_id="second", consent_terms_version=TERMS_VERSION)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.reason == "LOOKUP_IN_PROGRESS"
        assert refused.value.retry_after is not None


async def test_lookup_limited_to_chosen_banks(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client, bank_codes=["CMB", "CCB"])
        assert [s.bank_code for s in report.bank_summaries] == ["CCB", "CMB"]
        assert report.total_card_count == 3
        with pytest.raises(CardLookupError) as bad:
            await client.create_lookup(bank_codes=["NOPE"], consent_terms_version=TERMS_VERSION)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.field_violations[0][0] == "bank_codes[0]"


async def test_list_and_delete_reports(make_union: UnionFactory) -> None:
    union = await make_union(lookups={"requery_cooldown": timedelta(0)})
    client = await verified_client(union, ZHANG)
    async with client:
        names = []
        for _ in range(3):
            _, report = await run_lookup(client)
            names.append(report.name)
        page1 = await client.list_reports(page_size=2)
        assert [r.name for r in page1.reports] == names[::-1][:2]
        assert page1.next_page_token
        page2 = await client.list_reports(page_size=2, page_token=page1.next_page_token)
        assert [r.name for r in page2.reports] == [names[0]]
        assert page2.next_page_token == ""

        with pytest.raises(CardLookupError) as forged:
            await client.list_reports(page_token=page1.next_page_token[:-2] + "xx")
        assert forged.value.code == grpc.StatusCode.INVALID_ARGUMENT

        await client.delete_report(names[0])
        with pytest.raises(CardLookupError) as gone:
            await client.get_report(names[0])
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(CardLookupError) as twice:
            await client.delete_report(names[0])
        assert twice.value.code == grpc.StatusCode.NOT_FOUND
        assert len((await client.list_reports()).reports) == 2
