"""QuerySession: many queries on one bidirectional stream, against a real bank on a loopback port.

No assertion here is about wall-clock time: "a slow query does not hold back others" is shown by
the order answers arrive in (the slow one is delayed by an hour and never arrives), never by a
ceiling on how long anything took.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import Any

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from sqlalchemy import text

from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings, control_file, write_control_file
from server.bank.store import StoredCard
from server.population.generator import DEMO_PEOPLE, Person, people

SEED = 20211201
SIZE = 300  # the population of tests/conftest.py's seeded_banks_template
ZHANG = DEMO_PEOPLE[0].person  # 2 reportable ICBC cards (and a closed one)
LIU = DEMO_PEOPLE[3].person  # 55 ICBC cards
CHEN = DEMO_PEOPLE[4].person  # no cards anywhere
UNKNOWN_ID = "11010519491231002X"  # valid, unknown to every bank
AN_HOUR_MS = 3_600_000


def query(query_id: str, resident_id: str, name: str) -> pb.QuerySessionRequest:
    return pb.QuerySessionRequest(query_id=query_id, resident_id_number=resident_id, name=name)


def of(person: Person, query_id: str) -> pb.QuerySessionRequest:
    return query(query_id, person.resident_id_number, person.name)


async def exchange(
    stub: pb_grpc.BankQueryServiceAsyncStub, requests: Iterable[pb.QuerySessionRequest]
) -> tuple[list[pb.QuerySessionResponse], grpc.StatusCode, str]:
    """Send every request and half-close while reading; all answers and how the stream ended."""
    return await exchange_on(stub.QuerySession(timeout=30), requests)


async def exchange_on(
    call: grpc.aio.StreamStreamCall[Any, Any], messages: Iterable[Any]
) -> tuple[list[Any], grpc.StatusCode, str]:
    """`exchange` on any session stream (QueryBatchSession's tests use it too)."""

    async def send() -> None:
        for message in messages:
            await call.write(message)
        await call.done_writing()

    sender = asyncio.create_task(send())
    received: list[Any] = []
    try:
        async for response in call:
            received.append(response)
    except grpc.aio.AioRpcError as error:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        return received, error.code(), error.details() or ""
    await sender
    return received, await call.code(), await call.details()


async def query_cards(
    stub: pb_grpc.BankQueryServiceAsyncStub, resident_id: str, name: str
) -> tuple[list[pb.CardRecord], pb.QuerySummary]:
    messages = [
        m
        async for m in stub.QueryCards(
            pb.QueryCardsRequest(query_id="qc", resident_id_number=resident_id, name=name), timeout=10
        )
    ]
    assert messages[-1].WhichOneof("result") == "summary"
    return [m.card for m in messages[:-1]], messages[-1].summary


SessionCall = grpc.aio.StreamStreamCall[pb.QuerySessionRequest, pb.QuerySessionResponse]


async def next_answer(call: SessionCall) -> pb.QuerySessionResponse:
    response = await call.read()
    assert isinstance(response, pb.QuerySessionResponse)
    return response


async def eventually(condition: Callable[[], bool], attempts: int = 400) -> None:
    """Let the event loop run until `condition()` holds (bounded by attempts, not by a clock)."""
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def session_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("query-session-")]


# --- answers mean what QueryCards answers mean -----------------------------------------------


async def test_answers_match_query_cards(stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    generated = [p for p in people(SEED, SIZE) if p.index >= len(DEMO_PEOPLE)][:20]
    asked = [
        (ZHANG.resident_id_number, ZHANG.name),
        (LIU.resident_id_number, LIU.name),
        (CHEN.resident_id_number, CHEN.name),
        (ZHANG.resident_id_number, "李娜"),  # wrong name: like an unknown person
        (UNKNOWN_ID, "路人甲"),
        *((p.resident_id_number, p.name) for p in generated),
    ]
    answers, code, _ = await exchange(stub, (query(f"q{i}", *who) for i, who in enumerate(asked)))
    assert code == grpc.StatusCode.OK
    by_id = {a.query_id: a for a in answers}
    assert len(by_id) == len(answers) == len(asked)
    for i, who in enumerate(asked):
        response = by_id[f"q{i}"]
        assert response.WhichOneof("result") == "answer"
        cards, summary = await query_cards(stub, *who)
        assert list(response.answer.cards) == cards  # same records, same masking, same order
        assert response.answer.summary == summary
        assert summary.bank_code == "ICBC"
    assert len(by_id["q1"].answer.cards) == by_id["q1"].answer.summary.record_count == 55
    for empty in ("q2", "q3", "q4"):
        assert by_id[empty].answer.summary.record_count == 0
        assert not by_id[empty].answer.cards


async def test_find_cards_many_answers_like_find_cards(bank: RunningBank) -> None:
    sample = [p for p in people(SEED, SIZE)][::7]
    asked = [(p.resident_id_number, p.name) for p in sample]
    asked += [
        (UNKNOWN_ID, "路人甲"),
        (ZHANG.resident_id_number, "李娜"),  # wrong name
        (LIU.resident_id_number, LIU.name),  # asked twice in one batch
        (LIU.resident_id_number, LIU.name),
        (ZHANG.resident_id_number, ZHANG.name),
    ]
    many = bank.store.find_cards_many(asked)
    one_by_one: list[list[StoredCard]] = [bank.store.find_cards(rid, name) for rid, name in asked]
    assert many == one_by_one
    assert sum(len(cards) for cards in many) > 55
    assert bank.store.find_cards_many([]) == []


async def test_find_cards_many_reads_scheduled_closures_and_skips_closed_cards(bank: RunningBank) -> None:
    """The SQLite read bypasses SQLAlchemy's types: dates, NULLs and the closed filter must agree."""
    cards = bank.store.find_cards(LIU.resident_id_number, LIU.name)
    assert len(cards) >= 2
    scheduled, closed = cards[0].card_ref, cards[1].card_ref
    with bank.store._engine.begin() as connection:
        connection.execute(
            text("UPDATE bank_cards SET closure_scheduled_on = '2026-12-31' WHERE card_ref = :ref"),
            {"ref": scheduled},
        )
        connection.execute(
            text("UPDATE bank_cards SET status = 'closed' WHERE card_ref = :ref"), {"ref": closed}
        )
    [many] = bank.store.find_cards_many([(LIU.resident_id_number, LIU.name)])
    assert many == bank.store.find_cards(LIU.resident_id_number, LIU.name)
    by_ref = {card.card_ref: card for card in many}
    assert closed not in by_ref
    assert by_ref[scheduled].closure_scheduled_on == date(2026, 12, 31)
    assert isinstance(by_ref[scheduled].open_date, date)


async def test_many_pipelined_queries_each_answered_once(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    crowd = list(people(SEED, SIZE))
    asked = {f"pipelined-{i}": crowd[i % len(crowd)] for i in range(200)}
    answers, code, _ = await exchange(stub, (of(person, qid) for qid, person in asked.items()))
    assert code == grpc.StatusCode.OK
    assert Counter(a.query_id for a in answers) == Counter(dict.fromkeys(asked, 1))
    for response in answers:
        person = asked[response.query_id]
        expected = bank.store.find_cards(person.resident_id_number, person.name)
        assert response.answer.summary.record_count == len(response.answer.cards) == len(expected)


async def test_half_close_waits_for_outstanding_answers(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    bank.servicer.faults = FaultSettings(latency_ms=50, record_delay_ms=1)
    answers, code, _ = await exchange(stub, [of(ZHANG, "a"), of(LIU, "b"), of(CHEN, "c")])
    assert code == grpc.StatusCode.OK
    assert sorted(a.query_id for a in answers) == ["a", "b", "c"]
    assert all(a.answer.summary.record_count == len(a.answer.cards) for a in answers)


# --- one query failing fails only that query ---------------------------------------------------


async def test_invalid_query_gets_invalid_argument_and_the_stream_goes_on(
    stub: pb_grpc.BankQueryServiceAsyncStub,
) -> None:
    bad_check_digit = ZHANG.resident_id_number[:17] + ("0" if ZHANG.resident_id_number[17] != "0" else "1")
    answers, code, _ = await exchange(
        stub,
        [
            query("bad-id", bad_check_digit, ZHANG.name),
            query("bad-name", ZHANG.resident_id_number, "   "),
            query("has space", ZHANG.resident_id_number, ZHANG.name),
            query("all-bad", "1234", ""),
            of(ZHANG, "good"),
        ],
    )
    assert code == grpc.StatusCode.OK
    by_id = {a.query_id: a for a in answers}
    assert set(by_id) == {"bad-id", "bad-name", "has space", "all-bad", "good"}
    fields = {
        "bad-id": {"resident_id_number"},
        "bad-name": {"name"},
        "has space": {"query_id"},
        "all-bad": {"resident_id_number", "name"},
    }
    for query_id, named in fields.items():
        error = by_id[query_id].error
        assert by_id[query_id].WhichOneof("result") == "error"
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
        assert {f for f in ("query_id", "resident_id_number", "name") if f"{f}:" in error.message} == named
        # The values are never echoed.
        assert ZHANG.resident_id_number not in error.message
        assert bad_check_digit not in error.message
        assert ZHANG.name not in error.message
    assert by_id["good"].answer.summary.record_count == 2


async def test_malformed_bytes_end_the_stream_invalid_argument(bank: RunningBank) -> None:
    async with grpc.aio.insecure_channel(bank.address) as channel:
        raw = channel.stream_stream("/bankquery.v1.BankQueryService/QuerySession")
        call = raw(timeout=10)
        await call.write(b"\xff\xff\xff")
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await eventually(lambda: bank.servicer.open_sessions == 0)


async def test_outage_and_injected_errors_fail_single_queries(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    call = stub.QuerySession(timeout=30)
    bank.servicer.faults = FaultSettings(outage=True)
    await call.write(of(ZHANG, "during-outage"))
    await call.write(query("malformed-during-outage", "bad", ""))  # down: it parses nothing
    first, second = await next_answer(call), await next_answer(call)
    assert [first.query_id, second.query_id] == ["during-outage", "malformed-during-outage"]
    assert first.error.code == second.error.code == grpc.StatusCode.UNAVAILABLE.value[0] == 14

    bank.servicer.faults = FaultSettings(error_rate=1.0, error_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    await call.write(of(ZHANG, "injected"))
    injected = await next_answer(call)
    assert injected.query_id == "injected"
    assert injected.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]

    bank.servicer.faults = FaultSettings()  # recovered: the same stream answers again
    await call.write(of(ZHANG, "after"))
    after = await next_answer(call)
    assert after.query_id == "after"
    assert after.answer.summary.record_count == 2
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


# --- delays are per query -------------------------------------------------------------------


async def test_a_delayed_query_does_not_hold_back_the_others(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    call = stub.QuerySession(timeout=30)
    bank.servicer.faults = FaultSettings(latency_ms=AN_HOUR_MS)
    await call.write(of(LIU, "slow"))
    # Invalid queries are answered before any delay; its answer shows "slow" was read (in order)
    # under the hour-long latency.
    await call.write(query("marker", "bad", ""))
    assert (await next_answer(call)).query_id == "marker"

    bank.servicer.faults = FaultSettings()
    await call.write(of(ZHANG, "fast-1"))
    await call.write(of(CHEN, "fast-2"))
    arrived = {(await next_answer(call)).query_id, (await next_answer(call)).query_id}
    assert arrived == {"fast-1", "fast-2"}  # "slow" is still waiting out its hour
    call.cancel()
    await eventually(lambda: bank.servicer.open_sessions == 0 and not session_tasks())


async def test_record_delay_scales_with_the_cards_answered(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    call = stub.QuerySession(timeout=30)
    bank.servicer.faults = FaultSettings(record_delay_ms=AN_HOUR_MS)
    await call.write(of(LIU, "55-cards"))  # 55 hours
    await call.write(of(CHEN, "no-cards"))  # no records, no delay
    answer = await next_answer(call)
    assert answer.query_id == "no-cards"
    assert answer.answer.summary.record_count == 0
    call.cancel()
    await eventually(lambda: bank.servicer.open_sessions == 0 and not session_tasks())


# --- knobs that bend the answer ---------------------------------------------------------------


async def test_truncated_answers(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(truncate="omit_summary")
    (answer,), _, _ = await exchange(stub, [of(ZHANG, "q")])
    assert len(answer.answer.cards) == 2
    assert not answer.answer.HasField("summary")

    bank.servicer.faults = FaultSettings(truncate="wrong_count")
    (answer,), _, _ = await exchange(stub, [of(ZHANG, "q")])
    assert answer.answer.summary.record_count == 3 != len(answer.answer.cards)


async def test_lies(bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    bank.servicer.faults = FaultSettings(lie="wrong_bank")
    (answer,), _, _ = await exchange(stub, [of(ZHANG, "q")])
    assert answer.answer.summary.bank_code != "ICBC"
    assert all(c.bank_code != "ICBC" for c in answer.answer.cards)

    bank.servicer.faults = FaultSettings(lie="long_last_four")
    (answer,), _, _ = await exchange(stub, [of(ZHANG, "q")])
    assert all(len(c.last_four) == 5 for c in answer.answer.cards)

    bank.servicer.faults = FaultSettings(lie="unknown_enum")
    (answer,), _, _ = await exchange(stub, [of(ZHANG, "q")])
    assert all(c.card_type == 99 and c.status == 99 for c in answer.answer.cards)


# --- knobs that end the stream ----------------------------------------------------------------


async def test_die_after_records_ends_the_whole_stream(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    bank.servicer.faults = FaultSettings(die_after_records=10)
    answers, code, _ = await exchange(stub, [of(ZHANG, "two-cards"), of(LIU, "55-cards"), of(CHEN, "none")])
    # Answers due before the break are delivered; the rest are lost with the stream.
    assert [a.query_id for a in answers] == ["two-cards"]
    assert code == grpc.StatusCode.UNAVAILABLE

    bank.servicer.faults = FaultSettings(die_after_records=10, die_mode="end")
    answers, code, _ = await exchange(stub, [of(ZHANG, "two-cards"), of(LIU, "55-cards"), of(CHEN, "none")])
    assert [a.query_id for a in answers] == ["two-cards"]
    assert code == grpc.StatusCode.OK  # a clean end: only the missing answers give it away

    # As in QueryCards, an answer with exactly die_after_records cards is cut too (its summary
    # would be message die_after_records + 1).
    bank.servicer.faults = FaultSettings(die_after_records=2)
    answers, code, _ = await exchange(stub, [of(ZHANG, "exactly-two")])
    assert answers == []
    assert code == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: bank.servicer.open_sessions == 0 and not session_tasks())


async def test_query_session_off_answers_unimplemented(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    bank.servicer.faults = FaultSettings.parse(["query_session=0"])
    answers, code, _ = await exchange(stub, [of(ZHANG, "q")])
    assert answers == []
    assert code == grpc.StatusCode.UNIMPLEMENTED
    cards, _ = await query_cards(stub, ZHANG.resident_id_number, ZHANG.name)  # the old way still works
    assert len(cards) == 2


async def test_query_session_switched_off_at_run_time(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub, tmp_path: Path
) -> None:
    """Through the control file, as `cardlookup-bank faults --set query_session=0` does it."""
    call = stub.QuerySession(timeout=30)
    await call.write(of(ZHANG, "before"))
    assert (await next_answer(call)).query_id == "before"

    write_control_file(control_file(tmp_path, "ICBC"), ["query_session=0"])
    await eventually(lambda: not bank.servicer.faults.query_session)
    # The open stream goes away as if the bank restarted as an older version...
    await call.write(of(ZHANG, "after"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # ...and a new one is refused.
    answers, code, _ = await exchange(stub, [of(ZHANG, "new-stream")])
    assert (answers, code) == ([], grpc.StatusCode.UNIMPLEMENTED)

    control_file(tmp_path, "ICBC").unlink()
    await eventually(lambda: bank.servicer.faults.query_session)
    answers, code, _ = await exchange(stub, [of(ZHANG, "restored")])
    assert code == grpc.StatusCode.OK
    assert [a.query_id for a in answers] == ["restored"]


def test_query_session_knob_parses_strictly() -> None:
    assert FaultSettings().query_session is True
    assert FaultSettings.parse(["query_session=0"]).query_session is False
    assert FaultSettings.parse(["query_session=on"]).query_session is True
    assert FaultSettings.parse(["outage=yes"]).outage is True
    with pytest.raises(ValueError, match="query_session"):
        FaultSettings.parse(["query_session=maybe"])


# --- flow control and clean-up ----------------------------------------------------------------


async def test_the_bank_stops_reading_at_its_limit_of_unanswered_queries(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub, held_reads: threading.Event
) -> None:
    bank.servicer.max_outstanding = 4
    try:
        call = stub.QuerySession(timeout=30)
        for i in range(10):
            await call.write(of(ZHANG, f"q{i}"))
        await call.done_writing()
        await eventually(lambda: bank.servicer.session_received() == [4])
        for _ in range(20):  # the loop runs on; the bank reads no further while all 4 are unanswered
            await asyncio.sleep(0.01)
            assert bank.servicer.session_received() == [4]
    finally:
        held_reads.set()
    answers = [a async for a in call]
    assert sorted(a.query_id for a in answers) == sorted(f"q{i}" for i in range(10))
    assert await call.code() == grpc.StatusCode.OK


async def test_a_client_going_away_leaves_nothing_behind(
    bank: RunningBank, stub: pb_grpc.BankQueryServiceAsyncStub
) -> None:
    call = stub.QuerySession(timeout=30)
    await call.write(of(ZHANG, "answered"))
    assert (await next_answer(call)).query_id == "answered"
    bank.servicer.faults = FaultSettings(latency_ms=AN_HOUR_MS)
    for i in range(20):
        await call.write(of(LIU, f"pending-{i}"))  # waiting on timers when the client leaves
    await eventually(lambda: bank.servicer.session_received() == [21])
    assert session_tasks()
    call.cancel()
    await eventually(lambda: bank.servicer.open_sessions == 0 and not session_tasks())
