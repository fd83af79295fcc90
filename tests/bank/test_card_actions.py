"""CloseCard and ReportCardNotMine on real bank servers, called by a real grpc.aio client."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import TypeAlias, cast

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.bank.actions import (
    REASON_FROZEN,
    REASON_SCHEDULED,
    ClosureOutcome,
    billing_cycle_end,
    decide_closure,
    format_yuan,
)
from server.bank.bank_server import RunningBank, start_all_banks, start_bank
from server.bank.faults import FaultSettings
from server.bank.store import StoredCard
from server.population.generator import DEMO_PEOPLE, DemoPerson

SEED = 20211201
SIZE = 300
ZHANG = DEMO_PEOPLE[0]
LI = DEMO_PEOPLE[1]
WANG = DEMO_PEOPLE[2]
LIU = DEMO_PEOPLE[3]
CHEN = DEMO_PEOPLE[4]
TICKET = re.compile(r"^T-(?P<bank>[A-Z]+)-[0-9A-F]{10}$")
CASE = re.compile(r"^FR-(?P<bank>[A-Z]+)-[0-9]{8}$")

Stub: TypeAlias = "pb_grpc.BankQueryServiceAsyncStub"  # typing-only name (in the .pyi)


@pytest.fixture
async def banks(tmp_path: Path) -> AsyncIterator[dict[str, RunningBank]]:
    running = await start_all_banks(tmp_path, seed=SEED, size=SIZE, bank_codes=["ICBC", "CMB", "CCB"])
    yield {bank.bank_code: bank for bank in running}
    for bank in running:
        await bank.stop(0)


@pytest.fixture
async def stubs(banks: dict[str, RunningBank]) -> AsyncIterator[dict[str, Stub]]:
    channels = {code: grpc.aio.insecure_channel(bank.address) for code, bank in banks.items()}
    yield {code: pb_grpc.BankQueryServiceStub(channel) for code, channel in channels.items()}
    for channel in channels.values():
        await channel.close()


async def _records(stub: Stub, demo: DemoPerson) -> dict[str, pb.CardRecord]:
    """The person's reported cards at this bank by last four digits (QueryCards, as the union sees them)."""
    request = pb.QueryCardsRequest(
        query_id="q-refs", resident_id_number=demo.person.resident_id_number, name=demo.person.name
    )
    records = {}
    async for message in stub.QueryCards(request, timeout=5):
        if message.WhichOneof("result") == "card":
            records[message.card.last_four] = message.card
    return records


def _close(request_id: str, card_ref: str, demo: DemoPerson, name: str | None = None) -> pb.CloseCardRequest:
    return pb.CloseCardRequest(
        request_id=request_id,
        card_ref=card_ref,
        resident_id_number=demo.person.resident_id_number,
        name=demo.person.name if name is None else name,
    )


def _report(
    request_id: str, card_ref: str, demo: DemoPerson, name: str | None = None
) -> pb.ReportCardNotMineRequest:
    return pb.ReportCardNotMineRequest(
        request_id=request_id,
        card_ref=card_ref,
        resident_id_number=demo.person.resident_id_number,
        name=demo.person.name if name is None else name,
    )


def _closed_card_ref(bank: RunningBank, demo: DemoPerson, last_four: str) -> str:
    """A closed card is never reported; the bank's own tools still see its reference."""
    (card,) = [
        c for c in bank.store.cards_for_id(demo.person.resident_id_number) if c.number.endswith(last_four)
    ]
    assert card.status == "closed"
    return card.card_ref


def _field_violations(error: grpc.aio.AioRpcError) -> set[str]:
    status = rpc_status.from_call(cast(grpc.Call, error))
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return {v.field for v in bad_request.field_violations}


# --- the decision, as a pure function -------------------------------------------------------


def _card(card_type: str, status: str, balance_cents: int) -> StoredCard:
    return StoredCard(
        card_ref="cr_x",
        number="6222020000000000000",
        card_type=card_type,
        status=status,
        open_date=date(2020, 1, 1),
        last_activity_date=date(2025, 1, 1),
        balance_cents=balance_cents,
    )


@pytest.mark.parametrize(
    ("card_type", "status", "balance", "outcome", "reason"),
    [
        ("debit", "closed", 0, ClosureOutcome.CLOSED, "already closed"),
        ("credit", "closed", 0, ClosureOutcome.CLOSED, "already closed"),
        ("debit", "frozen", 0, ClosureOutcome.REJECTED, REASON_FROZEN),
        ("credit", "frozen", 500, ClosureOutcome.REJECTED, REASON_FROZEN),
        (
            "debit",
            "active",
            5_200_000,
            ClosureOutcome.BRANCH_VISIT_REQUIRED,
            "the card still holds ¥52,000.00; withdraw or transfer it at a branch first",
        ),
        (
            "debit",
            "dormant",
            1,
            ClosureOutcome.BRANCH_VISIT_REQUIRED,
            "the card still holds ¥0.01; withdraw or transfer it at a branch first",
        ),
        (
            "credit",
            "active",
            328_000,
            ClosureOutcome.BRANCH_VISIT_REQUIRED,
            "an outstanding balance of ¥3,280.00 must be repaid at a branch first",
        ),
        ("credit", "active", 0, ClosureOutcome.SCHEDULED, REASON_SCHEDULED),
        ("credit", "dormant", 0, ClosureOutcome.SCHEDULED, REASON_SCHEDULED),
        ("debit", "active", 0, ClosureOutcome.CLOSED, "closed"),
        ("debit", "dormant", 0, ClosureOutcome.CLOSED, "closed"),
    ],
)
def test_decide_closure(
    card_type: str, status: str, balance: int, outcome: ClosureOutcome, reason: str
) -> None:
    assert decide_closure(_card(card_type, status, balance)) == (outcome, reason)


def test_money_and_billing_cycle() -> None:
    assert format_yuan(0) == "¥0.00"
    assert format_yuan(5) == "¥0.05"
    assert format_yuan(123_456_789) == "¥1,234,567.89"
    assert billing_cycle_end(date(2024, 2, 10)) == date(2024, 2, 29)
    assert billing_cycle_end(date(2025, 12, 31)) == date(2025, 12, 31)


# --- CloseCard over the wire -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bank_code", "last_four", "outcome", "reason"),
    [
        ("ICBC", "1472", pb.CLOSURE_OUTCOME_CLOSED, "closed"),
        (
            "ICBC",
            "2353",
            pb.CLOSURE_OUTCOME_BRANCH_VISIT_REQUIRED,
            "an outstanding balance of ¥3,280.00 must be repaid at a branch first",
        ),
        (
            "CMB",
            "3666",
            pb.CLOSURE_OUTCOME_BRANCH_VISIT_REQUIRED,
            "the card still holds ¥52,000.00; withdraw or transfer it at a branch first",
        ),
        ("CMB", "2844", pb.CLOSURE_OUTCOME_CLOSED, "closed"),  # dormant, empty
        ("CCB", "0918", pb.CLOSURE_OUTCOME_SCHEDULED, REASON_SCHEDULED),
    ],
)
async def test_zhang_closure_outcomes(
    stubs: dict[str, Stub], bank_code: str, last_four: str, outcome: int, reason: str
) -> None:
    stub = stubs[bank_code]
    before = await _records(stub, ZHANG)
    record = before[last_four]
    response = await stub.CloseCard(_close("close-1", record.card_ref, ZHANG), timeout=5)
    assert response.outcome == outcome
    assert response.reason == reason
    match = TICKET.match(response.ticket_id)
    assert match is not None
    assert match["bank"] == bank_code

    after = await _records(stub, ZHANG)
    if outcome == pb.CLOSURE_OUTCOME_CLOSED:
        # A closed card is no longer reported; the others are untouched.
        assert last_four not in after
        assert set(after) == set(before) - {last_four}
    else:
        # Scheduled and branch-visit cards are still open and still reported as they were.
        assert after == before


async def test_closed_card_counts_as_found(banks: dict[str, RunningBank], stubs: dict[str, Stub]) -> None:
    card_ref = _closed_card_ref(banks["ICBC"], ZHANG, "7090")
    response = await stubs["ICBC"].CloseCard(_close("close-closed", card_ref, ZHANG), timeout=5)
    assert response.outcome == pb.CLOSURE_OUTCOME_CLOSED
    assert response.reason == "already closed"


async def test_scheduled_closure_is_recorded(banks: dict[str, RunningBank], stubs: dict[str, Stub]) -> None:
    record = (await _records(stubs["CCB"], ZHANG))["0918"]
    response = await stubs["CCB"].CloseCard(_close("sched-1", record.card_ref, ZHANG), timeout=5)
    assert response.outcome == pb.CLOSURE_OUTCOME_SCHEDULED
    card = banks["CCB"].store.find_card(ZHANG.person.resident_id_number, ZHANG.person.name, record.card_ref)
    assert card is not None
    assert card.status == "active"
    assert card.closure_scheduled_on is not None
    assert card.closure_scheduled_on >= date(2026, 1, 1)
    # Still reported, as active, until the cycle ends.
    assert (await _records(stubs["CCB"], ZHANG))["0918"].status == pb.CARD_STATUS_ACTIVE


async def test_frozen_card_is_rejected(stubs: dict[str, Stub]) -> None:
    records = await _records(stubs["ICBC"], LIU)
    frozen = [r for r in records.values() if r.status == pb.CARD_STATUS_FROZEN]
    assert {r.last_four for r in frozen} == {"5371", "2775", "0176"}
    for n, record in enumerate(frozen):
        response = await stubs["ICBC"].CloseCard(_close(f"frozen-{n}", record.card_ref, LIU), timeout=5)
        assert response.outcome == pb.CLOSURE_OUTCOME_REJECTED
        assert response.reason == REASON_FROZEN
    assert await _records(stubs["ICBC"], LIU) == records


# --- ReportCardNotMine ------------------------------------------------------------------------


async def test_not_mine_freezes_and_opens_a_case(
    banks: dict[str, RunningBank], stubs: dict[str, Stub]
) -> None:
    stub = stubs["ICBC"]
    record = (await _records(stub, ZHANG))["1472"]
    assert record.status == pb.CARD_STATUS_ACTIVE
    response = await stub.ReportCardNotMine(_report("fraud-1", record.card_ref, ZHANG), timeout=5)
    assert response.status == pb.CARD_STATUS_FROZEN
    match = CASE.match(response.case_number)
    assert match is not None
    assert match["bank"] == "ICBC"
    assert (await _records(stub, ZHANG))["1472"].status == pb.CARD_STATUS_FROZEN
    # Now frozen, the card cannot be closed until the fraud desk is done.
    closing = await stub.CloseCard(_close("close-after-fraud", record.card_ref, ZHANG), timeout=5)
    assert closing.outcome == pb.CLOSURE_OUTCOME_REJECTED
    # A second report (a new request) opens another case; the card stays frozen.
    again = await stub.ReportCardNotMine(_report("fraud-2", record.card_ref, ZHANG), timeout=5)
    assert again.status == pb.CARD_STATUS_FROZEN
    assert CASE.match(again.case_number)


async def test_not_mine_cancels_a_scheduled_closure(
    banks: dict[str, RunningBank], stubs: dict[str, Stub]
) -> None:
    record = (await _records(stubs["CCB"], ZHANG))["0918"]
    scheduled = await stubs["CCB"].CloseCard(_close("sched", record.card_ref, ZHANG), timeout=5)
    assert scheduled.outcome == pb.CLOSURE_OUTCOME_SCHEDULED
    response = await stubs["CCB"].ReportCardNotMine(_report("fraud", record.card_ref, ZHANG), timeout=5)
    assert response.status == pb.CARD_STATUS_FROZEN
    card = banks["CCB"].store.find_card(ZHANG.person.resident_id_number, ZHANG.person.name, record.card_ref)
    assert card is not None
    assert (card.status, card.closure_scheduled_on) == ("frozen", None)


async def test_not_mine_on_a_closed_card_keeps_it_closed(
    banks: dict[str, RunningBank], stubs: dict[str, Stub]
) -> None:
    card_ref = _closed_card_ref(banks["ICBC"], ZHANG, "7090")
    response = await stubs["ICBC"].ReportCardNotMine(_report("fraud-closed", card_ref, ZHANG), timeout=5)
    assert CASE.match(response.case_number)
    assert response.status == pb.CARD_STATUS_UNSPECIFIED  # no CardStatus for "closed"
    card = banks["ICBC"].store.find_card(ZHANG.person.resident_id_number, ZHANG.person.name, card_ref)
    assert card is not None
    assert card.status == "closed"
    assert "7090" not in await _records(stubs["ICBC"], ZHANG)


# --- idempotency ------------------------------------------------------------------------------


async def test_close_retry_returns_the_first_answer(stubs: dict[str, Stub]) -> None:
    stub = stubs["ICBC"]
    record = (await _records(stub, ZHANG))["1472"]
    first = await stub.CloseCard(_close("retry-me", record.card_ref, ZHANG), timeout=5)
    assert first.outcome == pb.CLOSURE_OUTCOME_CLOSED
    # The card is closed now; a fresh decision would say "already closed", a retry must not.
    for _ in range(3):
        again = await stub.CloseCard(_close("retry-me", record.card_ref, ZHANG), timeout=5)
        assert again == first
    fresh = await stub.CloseCard(_close("new-request", record.card_ref, ZHANG), timeout=5)
    assert (fresh.outcome, fresh.reason) == (pb.CLOSURE_OUTCOME_CLOSED, "already closed")
    assert fresh.ticket_id != first.ticket_id


async def test_concurrent_retries_get_one_answer(stubs: dict[str, Stub]) -> None:
    stub = stubs["CCB"]
    record = (await _records(stub, ZHANG))["0918"]
    answers = await asyncio.gather(
        *(stub.CloseCard(_close("racing", record.card_ref, ZHANG), timeout=5) for _ in range(8))
    )
    assert len({a.SerializeToString() for a in answers}) == 1
    reports = await asyncio.gather(
        *(stub.ReportCardNotMine(_report("racing-2", record.card_ref, ZHANG), timeout=5) for _ in range(8))
    )
    assert len({r.case_number for r in reports}) == 1


async def test_report_retry_returns_the_first_case(stubs: dict[str, Stub]) -> None:
    stub = stubs["ICBC"]
    record = (await _records(stub, ZHANG))["2353"]
    first = await stub.ReportCardNotMine(_report("fraud-retry", record.card_ref, ZHANG), timeout=5)
    again = await stub.ReportCardNotMine(_report("fraud-retry", record.card_ref, ZHANG), timeout=5)
    assert again == first


async def test_request_id_reused_for_another_card_or_kind(stubs: dict[str, Stub]) -> None:
    stub = stubs["ICBC"]
    records = await _records(stub, ZHANG)
    debit, credit = records["1472"], records["2353"]
    await stub.CloseCard(_close("once", credit.card_ref, ZHANG), timeout=5)
    calls = [
        stub.CloseCard(_close("once", debit.card_ref, ZHANG), timeout=5),
        stub.ReportCardNotMine(_report("once", credit.card_ref, ZHANG), timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field_violations(caught.value) == {"request_id"}
    # Nothing happened to the other card.
    assert (await _records(stub, ZHANG))["1472"] == debit


# --- not found, invalid, faults ----------------------------------------------------------------


async def test_not_found(banks: dict[str, RunningBank], stubs: dict[str, Stub]) -> None:
    stub = stubs["ICBC"]
    record = (await _records(stub, ZHANG))["1472"]
    wang_card = (await _records(stub, WANG))["3472"]
    cases = [
        _close("nf-1", record.card_ref, ZHANG, name="李娜"),  # wrong name
        _close("nf-2", record.card_ref, WANG),  # someone else's card
        _close("nf-3", wang_card.card_ref, ZHANG),  # and the other way round
        _close("nf-4", "cr_000000000000000000000000", ZHANG),  # no such card
        _close("nf-5", record.card_ref, CHEN),  # a person the bank does not know
    ]
    for request in cases:
        for call in (
            stub.CloseCard(request, timeout=5),
            stub.ReportCardNotMine(
                pb.ReportCardNotMineRequest(
                    request_id=request.request_id + "-r",
                    card_ref=request.card_ref,
                    resident_id_number=request.resident_id_number,
                    name=request.name,
                ),
                timeout=5,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert caught.value.details() == "no such card"
    # Nothing changed, and a refused request_id is not burnt: the owner can use it.
    assert (await _records(stub, ZHANG))["1472"] == record
    assert (await _records(stub, WANG))["3472"] == wang_card
    response = await stub.CloseCard(_close("nf-1", record.card_ref, ZHANG), timeout=5)
    assert response.outcome == pb.CLOSURE_OUTCOME_CLOSED


_ID = ZHANG.person.resident_id_number


@pytest.mark.parametrize(
    ("request_id", "card_ref", "resident_id", "name", "bad_fields"),
    [
        ("", "cr_1", _ID, "张伟", {"request_id"}),
        ("has space", "cr_1", _ID, "张伟", {"request_id"}),
        ("r1\n", "cr_1", _ID, "张伟", {"request_id"}),  # $ would let a trailing newline through
        ("r" * 65, "cr_1", _ID, "张伟", {"request_id"}),
        ("r1", "", _ID, "张伟", {"card_ref"}),
        ("r1", "c" * 129, _ID, "张伟", {"card_ref"}),
        ("r1", "cr_1\n", _ID, "张伟", {"card_ref"}),
        ("r1", "cr_1", _ID[:17] + "0", "张伟", {"resident_id_number"}),
        ("r1", "cr_1", "1234", "张伟", {"resident_id_number"}),
        ("r1", "cr_1", _ID, "  ", {"name"}),
        ("r1", "cr_1", _ID, "名" * 65, {"name"}),
        ("", "", "", "", {"request_id", "card_ref", "resident_id_number", "name"}),
    ],
)
async def test_invalid_argument_names_the_fields(
    stubs: dict[str, Stub], request_id: str, card_ref: str, resident_id: str, name: str, bad_fields: set[str]
) -> None:
    stub = stubs["ICBC"]
    fields = {"request_id": request_id, "card_ref": card_ref, "resident_id_number": resident_id, "name": name}
    for call in (
        stub.CloseCard(pb.CloseCardRequest(**fields), timeout=5),
        stub.ReportCardNotMine(pb.ReportCardNotMineRequest(**fields), timeout=5),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field_violations(caught.value) == bad_fields
        if resident_id:
            assert resident_id not in (caught.value.details() or "")


async def test_faults_apply(banks: dict[str, RunningBank], stubs: dict[str, Stub]) -> None:
    bank, stub = banks["ICBC"], stubs["ICBC"]
    records = await _records(stub, ZHANG)
    record, credit = records["1472"], records["2353"]

    bank.servicer.faults = FaultSettings(outage=True)
    for call in (
        stub.CloseCard(_close("f-1", record.card_ref, ZHANG), timeout=5),
        stub.ReportCardNotMine(_report("f-2", record.card_ref, ZHANG), timeout=5),
        stub.CloseCard(pb.CloseCardRequest(), timeout=5),  # down: it parses nothing
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    bank.servicer.faults = FaultSettings(error_rate=1.0, error_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CloseCard(_close("f-3", record.card_ref, ZHANG), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # (On the credit card, whose answer changes nothing, in case the server finishes after the deadline.)
    bank.servicer.faults = FaultSettings(latency_ms=300)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CloseCard(_close("f-4", credit.card_ref, ZHANG), timeout=0.1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.perf_counter()
    slow = await stub.CloseCard(_close("f-4b", credit.card_ref, ZHANG), timeout=5)
    assert slow.outcome == pb.CLOSURE_OUTCOME_BRANCH_VISIT_REQUIRED
    assert time.perf_counter() - started >= 0.3

    # Stream-only knobs do not touch a unary answer.
    bank.servicer.faults = FaultSettings(die_after_records=0, truncate="omit_summary", lie="wrong_bank")
    started = time.perf_counter()
    response = await stub.CloseCard(_close("f-5", record.card_ref, ZHANG), timeout=5)
    assert response.outcome == pb.CLOSURE_OUTCOME_CLOSED
    assert TICKET.match(response.ticket_id)
    assert response.ticket_id.startswith("T-ICBC-")
    assert time.perf_counter() - started < 2

    # Failed calls decided nothing: the refused request_ids are still free.
    bank.servicer.faults = FaultSettings()
    response = await stub.CloseCard(_close("f-1", record.card_ref, ZHANG), timeout=5)
    assert (response.outcome, response.reason) == (pb.CLOSURE_OUTCOME_CLOSED, "already closed")


async def test_no_card_number_or_id_in_answers_or_logs(
    stubs: dict[str, Stub], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wire: list[bytes] = []
    for code in ("ICBC", "CMB", "CCB"):
        records = await _records(stubs[code], ZHANG)
        for n, record in enumerate(records.values()):
            closed = await stubs[code].CloseCard(_close(f"c{n}", record.card_ref, ZHANG), timeout=5)
            reported = await stubs[code].ReportCardNotMine(
                _report(f"r{n}", record.card_ref, ZHANG), timeout=5
            )
            wire += [closed.SerializeToString(), reported.SerializeToString()]
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "answered card action" in logged
    for card in ZHANG.cards:
        assert all(card.number.encode() not in message for message in wire)
        assert card.number not in logged
    assert ZHANG.person.resident_id_number not in logged


# --- an old store ------------------------------------------------------------------------------

# The cards table as the first release created it: no balance, no closure schedule.
_OLD_SCHEMA = """
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
    customer_id VARCHAR(18) NOT NULL REFERENCES customers (resident_id_number),
    CONSTRAINT ck_bank_cards_card_type CHECK (card_type IN ('debit', 'credit')),
    CONSTRAINT ck_bank_cards_status CHECK (status IN ('active', 'dormant', 'frozen', 'closed'))
);
CREATE INDEX ix_bank_cards_customer ON bank_cards (customer_id);
"""


async def test_store_from_before_balances_is_upgraded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "icbc.sqlite3"
    person = ZHANG.person
    icbc = [c for c in ZHANG.cards if c.bank_code == "ICBC"]
    with sqlite3.connect(path) as connection:
        connection.executescript(_OLD_SCHEMA)
        connection.execute(
            "INSERT INTO customers VALUES (?, ?, ?)",
            (person.resident_id_number, person.name, person.mobile_number),
        )
        connection.executemany(
            "INSERT INTO bank_cards VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (f"cr_old{n}", c.number, c.card_type, c.status, c.open_date.isoformat(),
                 c.last_activity_date.isoformat(), person.resident_id_number)
                for n, c in enumerate(icbc)
            ],
        )  # fmt: skip
    connection.close()

    caplog.set_level(logging.WARNING, logger="server.bank.store")
    running = await start_bank("ICBC", database_url=f"sqlite:///{path}", data_dir=tmp_path, seed=SEED, size=3)
    try:
        assert any("older version" in r.getMessage() for r in caplog.records)
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = pb_grpc.BankQueryServiceStub(channel)
            records = await _records(stub, ZHANG)
            assert set(records) == {"1472", "2353"}
            # Seeded before balances existed: every card holds 0, so the credit card is scheduled.
            credit = await stub.CloseCard(_close("old-1", records["2353"].card_ref, ZHANG), timeout=5)
            assert credit.outcome == pb.CLOSURE_OUTCOME_SCHEDULED
            debit = await stub.CloseCard(_close("old-2", records["1472"].card_ref, ZHANG), timeout=5)
            assert debit.outcome == pb.CLOSURE_OUTCOME_CLOSED
            assert set(await _records(stub, ZHANG)) == {"2353"}
        assert running.store.customer_count() == 1  # an existing store is not re-seeded
    finally:
        await running.stop(0)
    # Opening it again finds nothing to upgrade.
    caplog.clear()
    again = await start_bank("ICBC", database_url=f"sqlite:///{path}", data_dir=tmp_path, seed=SEED, size=3)
    await again.stop(0)
    assert not any("older version" in r.getMessage() for r in caplog.records)
