"""A real bank server on a loopback port, called by a real grpc.aio client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from server.bank.bank_server import RunningBank, start_all_banks, start_bank
from server.bank.faults import FaultSettings
from server.bank.store import BankStore, default_database_url
from server.common.checks import is_valid_resident_id
from server.population.catalogue import BANKS
from server.population.generator import DEMO_PEOPLE, cards_at_bank, people

SEED = 20211201
SIZE = 300
ZHANG = DEMO_PEOPLE[0]  # ICBC debit + credit active, one closed ICBC debit
LIU = DEMO_PEOPLE[3]  # 55 ICBC cards
CHEN = DEMO_PEOPLE[4]  # no cards anywhere


@pytest.fixture
async def bank(tmp_path: Path) -> AsyncIterator[RunningBank]:
    running = await start_bank("ICBC", data_dir=tmp_path, seed=SEED, size=SIZE)
    yield running
    await running.stop(0)


# `stub` (tests/bank/conftest.py) talks to this module's own `bank`.


async def _query(
    stub: pb_grpc.BankQueryServiceAsyncStub,
    resident_id: str,
    name: str,
    query_id: str = "q-1",
    deadline: float = 5.0,
) -> tuple[list[pb.QueryCardsResponse], grpc.aio.AioRpcError | None]:
    """Everything the stream delivered, and the error that ended it (None if it ended OK)."""
    received: list[pb.QueryCardsResponse] = []
    call = stub.QueryCards(
        pb.QueryCardsRequest(query_id=query_id, resident_id_number=resident_id, name=name), timeout=deadline
    )
    try:
        async for message in call:
            received.append(message)
    except grpc.aio.AioRpcError as error:
        return received, error
    return received, None


def _cards(messages: list[pb.QueryCardsResponse]) -> list[pb.CardRecord]:
    return [m.card for m in messages if m.WhichOneof("result") == "card"]


def _summary(messages: list[pb.QueryCardsResponse]) -> pb.QuerySummary | None:
    if messages and messages[-1].WhichOneof("result") == "summary":
        return messages[-1].summary
    return None


async def test_streams_cards_then_summary(stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    messages, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert error is None
    cards = _cards(messages)
    summary = _summary(messages)
    assert summary is not None
    assert summary.bank_code == "ICBC"
    assert summary.record_count == len(cards) == len(messages) - 1
    # The closed ICBC card is never reported.
    expected = [c for c in ZHANG.cards if c.bank_code == "ICBC" and c.status != "closed"]
    assert len(cards) == len(expected) == 2
    assert sorted((c.first_four, c.last_four, c.number_length) for c in cards) == sorted(
        (c.number[:4], c.number[-4:], len(c.number)) for c in expected
    )
    assert {c.card_type for c in cards} == {pb.CARD_TYPE_DEBIT, pb.CARD_TYPE_CREDIT}
    assert all(c.bank_code == "ICBC" and c.card_ref and c.status == pb.CARD_STATUS_ACTIVE for c in cards)
    assert all(c.open_time.seconds > 0 for c in cards)


async def test_heavy_holder_and_statuses(stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    messages, error = await _query(stub, LIU.person.resident_id_number, LIU.person.name)
    assert error is None
    cards = _cards(messages)
    summary = _summary(messages)
    assert summary is not None
    assert summary.record_count == len(cards) == 55
    statuses = {c.status for c in cards}
    assert statuses == {pb.CARD_STATUS_ACTIVE, pb.CARD_STATUS_DORMANT, pb.CARD_STATUS_FROZEN}
    assert len({c.card_ref for c in cards}) == 55


async def test_generated_person_matches_generator(stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    holders = [
        (p, [c for c in cards_at_bank(SEED, p, "ICBC") if c.status != "closed"])
        for p in people(SEED, SIZE)
        if p.index >= len(DEMO_PEOPLE)
    ]
    person, expected = next((p, cards) for p, cards in holders if cards)
    messages, error = await _query(stub, person.resident_id_number, person.name)
    assert error is None
    assert sorted(c.last_four for c in _cards(messages)) == sorted(c.number[-4:] for c in expected)


@pytest.mark.parametrize(
    ("resident_id", "name"),
    [
        (ZHANG.person.resident_id_number, "李娜"),  # name mismatch answers like an unknown person
        (CHEN.person.resident_id_number, CHEN.person.name),  # no cards at all
        ("11010519491231002X", "路人甲"),  # valid ID, unknown here
    ],
)
async def test_unknown_or_mismatched_person_gets_empty_answer(
    stub: pb_grpc.BankQueryServiceAsyncStub, resident_id: str, name: str
) -> None:
    assert is_valid_resident_id(resident_id)
    messages, error = await _query(stub, resident_id, name)
    assert error is None
    assert len(messages) == 1
    summary = _summary(messages)
    assert summary is not None
    assert summary.record_count == 0
    assert summary.bank_code == "ICBC"


@pytest.mark.parametrize(
    ("query_id", "resident_id", "name", "bad_fields"),
    [
        ("", ZHANG.person.resident_id_number, "张伟", {"query_id"}),
        ("has space", ZHANG.person.resident_id_number, "张伟", {"query_id"}),
        ("q" * 65, ZHANG.person.resident_id_number, "张伟", {"query_id"}),
        ("q1", ZHANG.person.resident_id_number[:17] + "0", "张伟", {"resident_id_number"}),
        ("q1", "31010419850230991X", "张伟", {"resident_id_number"}),  # 30 February
        ("q1", "1234", "张伟", {"resident_id_number"}),
        ("q1", ZHANG.person.resident_id_number, "   ", {"name"}),
        ("q1", ZHANG.person.resident_id_number, "名" * 65, {"name"}),
        ("", "", "", {"query_id", "resident_id_number", "name"}),
    ],
)
async def test_invalid_argument_names_the_fields(
    stub: pb_grpc.BankQueryServiceAsyncStub, query_id: str, resident_id: str, name: str, bad_fields: set[str]
) -> None:
    messages, error = await _query(stub, resident_id, name, query_id=query_id)
    assert messages == []
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # AioRpcError has the sync Call accessors from_call reads (code, details, trailing metadata).
    status = rpc_status.from_call(cast(grpc.Call, error))
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert {v.field for v in bad_request.field_violations} == bad_fields
    # The caller's values are never echoed back.
    if resident_id:
        assert resident_id not in (error.details() or "")


async def test_no_full_card_number_or_id_on_the_wire(stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    for demo in (ZHANG, LIU):
        messages, error = await _query(stub, demo.person.resident_id_number, demo.person.name)
        assert error is None
        wire = b"".join(m.SerializeToString() for m in messages)
        text = "".join(str(m) for m in messages)
        for card in demo.cards:
            assert card.number.encode() not in wire
            assert card.number not in text
            assert card.number[4:-4].encode() not in wire  # not even the hidden middle digits
        assert demo.person.resident_id_number.encode() not in wire


async def test_health_is_serving(bank: RunningBank) -> None:
    async with grpc.aio.insecure_channel(bank.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "bankquery.v1.BankQueryService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


# --- fault knobs, observed from a real client ----------------------------------------------


async def test_outage_answers_unavailable(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(outage=True)
    messages, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert messages == []
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # Even a malformed request: the bank is down, it parses nothing.
    _, error = await _query(stub, "bad", "")
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # Recovery at run time, without a restart.
    bank.servicer.faults = FaultSettings()
    messages, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert error is None
    assert len(messages) == 3


async def test_error_rate_and_code(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(error_rate=1.0, error_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    messages, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert messages == []
    assert error is not None
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bank.servicer.faults = FaultSettings(error_rate=0.5)
    outcomes = [await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name) for _ in range(40)]
    failures = sum(1 for _, error in outcomes if error is not None)
    assert 5 < failures < 35
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE for _, e in outcomes if e is not None)


async def test_latency_and_deadline(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(latency_ms=300, latency_jitter_ms=50)
    started = time.perf_counter()
    _, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    elapsed = time.perf_counter() - started
    assert error is None
    assert elapsed >= 0.3  # the injected latency really delayed the answer (a floor, never a ceiling)
    _, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name, deadline=0.1)
    assert error is not None
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    bank.servicer.faults = FaultSettings(tail_rate=1.0, tail_latency_ms=250)
    started = time.perf_counter()
    await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert time.perf_counter() - started >= 0.25


async def test_slow_stream(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(record_delay_ms=100)
    arrivals: list[float] = []
    call = stub.QueryCards(
        pb.QueryCardsRequest(
            query_id="slow", resident_id_number=ZHANG.person.resident_id_number, name=ZHANG.person.name
        ),
        timeout=5,
    )
    async for _ in call:
        arrivals.append(time.perf_counter())
    assert len(arrivals) == 3
    assert arrivals[1] - arrivals[0] >= 0.08  # records trickle in one by one


async def test_die_after_records(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(die_after_records=10)
    messages, error = await _query(stub, LIU.person.resident_id_number, LIU.person.name)
    assert len(messages) == 10
    assert _summary(messages) is None
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE

    bank.servicer.faults = FaultSettings(die_after_records=10, die_mode="end")
    messages, error = await _query(stub, LIU.person.resident_id_number, LIU.person.name)
    assert error is None  # a clean end: only the missing summary gives it away
    assert len(messages) == 10
    assert _summary(messages) is None

    # With exactly as many cards as the limit, it is the summary that is lost.
    bank.servicer.faults = FaultSettings(die_after_records=2, die_mode="end")
    messages, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert error is None
    assert len(_cards(messages)) == 2
    assert _summary(messages) is None


async def test_truncated_answers(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(truncate="omit_summary")
    messages, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert error is None
    assert len(_cards(messages)) == 2
    assert _summary(messages) is None

    bank.servicer.faults = FaultSettings(truncate="wrong_count")
    messages, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    summary = _summary(messages)
    assert summary is not None
    assert summary.record_count == 3 != len(_cards(messages))


async def test_lies(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(lie="wrong_bank")
    messages, _ = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    summary = _summary(messages)
    assert summary is not None
    assert summary.bank_code != "ICBC"
    assert all(c.bank_code != "ICBC" for c in _cards(messages))

    bank.servicer.faults = FaultSettings(lie="long_last_four")
    messages, _ = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert all(len(c.last_four) == 5 for c in _cards(messages))

    bank.servicer.faults = FaultSettings(lie="unknown_enum")
    messages, _ = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
    assert all(c.card_type == 99 and c.status == 99 for c in _cards(messages))


def test_fault_settings_parse_and_validate() -> None:
    specs = ["latency_ms=200", "error_rate=0.25", "error_code=deadline_exceeded", "outage=true"]
    settings = FaultSettings.parse([*specs, "die_after_records=3"])
    assert settings == FaultSettings(
        latency_ms=200,
        error_rate=0.25,
        error_code=grpc.StatusCode.DEADLINE_EXCEEDED,
        outage=True,
        die_after_records=3,
    )
    assert FaultSettings.parse(["lie=wrong_bank"]).lie == "wrong_bank"
    for bad in (["nonsense=1"], ["latency_ms"], ["error_rate=2"], ["lie=sometimes"], ["error_code=NOPE"]):
        with pytest.raises(ValueError, match=r"."):
            FaultSettings.parse(bad)


# --- the store ---------------------------------------------------------------------------


def test_store_seeds_only_this_banks_customers(tmp_path: Path) -> None:
    store = BankStore("CMB", default_database_url(tmp_path, "CMB"))
    store.create_schema()
    added = store.seed(SEED, SIZE)
    holders = [p for p in people(SEED, SIZE) if cards_at_bank(SEED, p, "CMB")]
    assert added == len(holders) == store.customer_count()
    assert store.card_count() == sum(len(cards_at_bank(SEED, p, "CMB")) for p in holders)
    # 张伟's dormant CMB card is reported; a closed one would not be.
    cards = store.find_cards(ZHANG.person.resident_id_number, ZHANG.person.name)
    assert sorted(c.status for c in cards) == ["active", "dormant"]
    assert store.find_cards(ZHANG.person.resident_id_number, "王芳") == []
    store.close()


def test_store_add_customer_and_card(tmp_path: Path) -> None:
    store = BankStore("CZB", f"sqlite:///{tmp_path}/czb.sqlite3")
    store.create_schema()
    resident_id = "33010619950909996" + "5"
    store.add_customer(resident_id, "陈静", "19957081234")
    card = store.add_card(resident_id, "6213300000000000009", "debit")
    closed = store.add_card(resident_id, "6213320000000000008", "debit", status="closed")
    found = store.find_cards(resident_id, "陈静")
    assert [c.card_ref for c in found] == [card.card_ref]
    assert {c.card_ref for c in store.cards_for_id(resident_id)} == {card.card_ref, closed.card_ref}
    with pytest.raises(LookupError):
        store.add_card("110105194912310021", "6213300000000000017", "debit")
    with pytest.raises(ValueError, match="card type"):
        store.add_card(resident_id, "6213300000000000025", "prepaid")
    store.close()


async def test_all_banks_in_one_process(tmp_path: Path) -> None:
    banks = await start_all_banks(tmp_path, seed=SEED, size=SIZE)
    try:
        assert [b.bank_code for b in banks] == [bank.code for bank in BANKS]
        assert len({b.port for b in banks}) == 16
        assert len({b.store.database_url for b in banks}) == 16  # a database of its own each
        # 李娜 has cards at BOC, ABC, PSBC and CMB; every other bank answers 0.
        counts: dict[str, int] = {}
        for running in banks:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = pb_grpc.BankQueryServiceStub(channel)
                messages, error = await _query(stub, DEMO_PEOPLE[1].person.resident_id_number, "李娜")
                assert error is None
                summary = _summary(messages)
                assert summary is not None
                assert summary.bank_code == running.bank_code
                counts[running.bank_code] = summary.record_count
        assert {code for code, n in counts.items() if n} == {"BOC", "ABC", "PSBC", "CMB"}
    finally:
        for running in banks:
            await running.stop(0)


async def test_faults_change_at_run_time_through_the_control_file(tmp_path: Path) -> None:
    """A bank in another process is reconfigured by its control file (`cardlookup-bank faults`)."""
    from server.bank.faults import control_file, write_control_file

    running = await start_bank("ICBC", data_dir=tmp_path, seed=SEED, size=SIZE)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = pb_grpc.BankQueryServiceStub(channel)
            _, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
            assert error is None

            write_control_file(control_file(tmp_path, "ICBC"), ["outage=1"])
            for _ in range(40):
                _, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
                if error is not None:
                    break
                await asyncio.sleep(0.05)
            assert error is not None
            assert error.code() == grpc.StatusCode.UNAVAILABLE

            control_file(tmp_path, "ICBC").unlink()
            for _ in range(40):
                _, error = await _query(stub, ZHANG.person.resident_id_number, ZHANG.person.name)
                if error is None:
                    break
                await asyncio.sleep(0.05)
            assert error is None
    finally:
        await running.stop(0)
