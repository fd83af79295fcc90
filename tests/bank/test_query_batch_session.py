"""QueryBatchSession: QuerySession with several queries and answers to a message, against a real bank.

What QuerySession's tests pin (answers equal QueryCards', per-query faults and delays, knobs that end
the stream) is shared code; these pin what batches add: every query of a batch answered exactly once
with the same answer, answers that are ready together sent together, the limits on a batch, flow
control counted in queries, and negotiation (a bank may have QuerySession but no batches).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc

from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings, control_file, write_control_file
from server.bank.service import MAX_BATCH
from server.population.generator import people
from tests.bank.test_query_session import (
    CHEN,
    LIU,
    SEED,
    SIZE,
    ZHANG,
    eventually,
    exchange,
    exchange_on,
    of,
    query,
    query_cards,
    session_tasks,
)

Batch = Sequence[pb.QuerySessionRequest]


async def exchange_batches(
    stub: pb_grpc.BankQueryServiceAsyncStub, batches: Iterable[Batch]
) -> tuple[list[pb.QueryBatchSessionResponse], grpc.StatusCode, str]:
    """Send every batch and half-close while reading; every response message and the stream's end."""
    requests = (pb.QueryBatchSessionRequest(queries=batch) for batch in batches)
    return await exchange_on(stub.QueryBatchSession(timeout=30), requests)


def answers_of(messages: Iterable[pb.QueryBatchSessionResponse]) -> list[pb.QuerySessionResponse]:
    return [answer for message in messages for answer in message.answers]


async def test_every_query_of_every_batch_is_answered_once_as_query_cards_answers_it(
    stub: pb_grpc.BankQueryServiceAsyncStub,
) -> None:
    crowd = list(people(SEED, SIZE))[:40]
    asked = {f"b{i}": person for i, person in enumerate(crowd)}
    asked["liu"] = LIU  # 55 cards
    asked["chen"] = CHEN  # none
    requests = [of(person, query_id) for query_id, person in asked.items()]
    batches = [requests[:1], requests[1:25], requests[25:]]
    messages, code, _ = await exchange_batches(stub, batches)
    assert code == grpc.StatusCode.OK
    answers = answers_of(messages)
    assert Counter(a.query_id for a in answers) == Counter(dict.fromkeys(asked, 1))
    for answer in answers:
        person = asked[answer.query_id]
        cards, summary = await query_cards(stub, person.resident_id_number, person.name)
        assert answer.WhichOneof("result") == "answer"
        assert list(answer.answer.cards) == cards
        assert answer.answer.summary == summary
    # Answers that were ready together went together: fewer messages than answers.
    assert all(message.answers for message in messages)
    assert len(messages) < len(answers)


async def test_a_batch_answers_the_same_as_a_query_session(stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    requests = [
        of(ZHANG, "zhang"),
        of(LIU, "liu"),
        of(CHEN, "chen"),
        query("wrong-name", ZHANG.resident_id_number, "李娜"),
    ]
    batched, code, _ = await exchange_batches(stub, [requests])
    assert code == grpc.StatusCode.OK
    single, code, _ = await exchange(stub, requests)
    assert code == grpc.StatusCode.OK
    by_id = {a.query_id: a for a in single}
    assert {a.query_id: a for a in answers_of(batched)} == by_id
    assert len(by_id) == 4


async def test_an_invalid_query_fails_alone_inside_its_batch(stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    messages, code, _ = await exchange_batches(
        stub, [[of(ZHANG, "good-1"), query("bad", "1234", ""), of(LIU, "good-2")]]
    )
    assert code == grpc.StatusCode.OK
    by_id = {a.query_id: a for a in answers_of(messages)}
    assert set(by_id) == {"good-1", "bad", "good-2"}
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert ZHANG.name not in by_id["bad"].error.message
    assert by_id["good-1"].answer.summary.record_count == 2
    assert by_id["good-2"].answer.summary.record_count == 55


async def test_injected_faults_apply_per_query_in_a_batch(
    bank: RunningBank,
    stub: pb_grpc.BankQueryServiceAsyncStub,
) -> None:
    bank.servicer.faults = FaultSettings(outage=True)
    messages, code, _ = await exchange_batches(stub, [[of(ZHANG, "a"), of(LIU, "b")]])
    assert code == grpc.StatusCode.OK
    answers = answers_of(messages)
    assert sorted(a.query_id for a in answers) == ["a", "b"]
    assert {a.error.code for a in answers} == {grpc.StatusCode.UNAVAILABLE.value[0]}


@pytest.mark.parametrize("size", [0, MAX_BATCH + 1])
async def test_a_batch_of_no_queries_or_too_many_ends_the_stream_invalid_argument(
    bank: RunningBank,
    stub: pb_grpc.BankQueryServiceAsyncStub,
    size: int,
) -> None:
    messages, code, details = await exchange_batches(
        stub, [[of(ZHANG, "first")], [of(ZHANG, f"q{i}") for i in range(size)]]
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "queries" in details
    assert [a.query_id for a in answers_of(messages)] in (["first"], [])  # answered before, or lost
    await eventually(lambda: bank.servicer.open_sessions == 0 and not session_tasks())


async def test_a_full_batch_is_accepted(stub: pb_grpc.BankQueryServiceAsyncStub) -> None:
    messages, code, _ = await exchange_batches(stub, [[of(CHEN, f"q{i}") for i in range(MAX_BATCH)]])
    assert code == grpc.StatusCode.OK
    assert len(answers_of(messages)) == MAX_BATCH


async def test_flow_control_counts_queries_not_messages(
    bank: RunningBank,
    stub: pb_grpc.BankQueryServiceAsyncStub,
    held_reads: threading.Event,
) -> None:
    """At a limit of 4: the first batch of 3 leaves room, so the second is read (6 unanswered, one
    batch past the limit); then the bank reads no further until answers go out."""
    bank.servicer.max_outstanding = 4
    try:
        call = stub.QueryBatchSession(timeout=30)
        for batch in range(5):
            await call.write(
                pb.QueryBatchSessionRequest(queries=[of(ZHANG, f"q{batch}-{i}") for i in range(3)])
            )
        await call.done_writing()
        await eventually(lambda: bank.servicer.session_received() == [6])
        for _ in range(20):
            await asyncio.sleep(0.01)
            assert bank.servicer.session_received() == [6]
    finally:
        held_reads.set()
    answers = answers_of([m async for m in call])
    assert sorted(a.query_id for a in answers) == sorted(f"q{b}-{i}" for b in range(5) for i in range(3))
    assert await call.code() == grpc.StatusCode.OK


async def test_the_stream_dies_as_a_query_session_does(
    bank: RunningBank,
    stub: pb_grpc.BankQueryServiceAsyncStub,
) -> None:
    bank.servicer.faults = FaultSettings(die_after_records=10)
    messages, code, _ = await exchange_batches(stub, [[of(ZHANG, "two-cards"), of(LIU, "55-cards")]])
    assert [a.query_id for a in answers_of(messages)] in (["two-cards"], [])
    assert code == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: bank.servicer.open_sessions == 0 and not session_tasks())


# --- negotiation ------------------------------------------------------------------------------


async def test_a_bank_without_batches_still_has_query_session(
    bank: RunningBank,
    stub: pb_grpc.BankQueryServiceAsyncStub,
) -> None:
    bank.servicer.faults = FaultSettings.parse(["query_batches=0"])
    messages, code, _ = await exchange_batches(stub, [[of(ZHANG, "q")]])
    assert (messages, code) == ([], grpc.StatusCode.UNIMPLEMENTED)
    answers, code, _ = await exchange(stub, [of(ZHANG, "q")])
    assert code == grpc.StatusCode.OK
    assert answers[0].answer.summary.record_count == 2


async def test_a_bank_without_sessions_has_no_batches_either(
    bank: RunningBank,
    stub: pb_grpc.BankQueryServiceAsyncStub,
) -> None:
    bank.servicer.faults = FaultSettings.parse(["query_session=0"])
    messages, code, _ = await exchange_batches(stub, [[of(ZHANG, "q")]])
    assert (messages, code) == ([], grpc.StatusCode.UNIMPLEMENTED)


async def test_batches_switched_off_at_run_time(
    bank: RunningBank,
    stub: pb_grpc.BankQueryServiceAsyncStub,
    tmp_path: Path,
) -> None:
    """Through the control file, as `cardlookup-bank faults --set query_batches=0` does it."""
    call = stub.QueryBatchSession(timeout=30)
    await call.write(pb.QueryBatchSessionRequest(queries=[of(ZHANG, "before")]))
    first = await call.read()
    assert isinstance(first, pb.QueryBatchSessionResponse)
    assert [a.query_id for a in first.answers] == ["before"]

    write_control_file(control_file(tmp_path, "ICBC"), ["query_batches=0"])
    await eventually(lambda: not bank.servicer.faults.query_batches)
    # The open stream goes away as if the bank restarted as a version without batches...
    await call.write(pb.QueryBatchSessionRequest(queries=[of(ZHANG, "after")]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # ...a new one is refused, and QuerySession goes on.
    messages, code, _ = await exchange_batches(stub, [[of(ZHANG, "new-stream")]])
    assert (messages, code) == ([], grpc.StatusCode.UNIMPLEMENTED)
    answers, code, _ = await exchange(stub, [of(ZHANG, "plain")])
    assert code == grpc.StatusCode.OK
    assert [a.query_id for a in answers] == ["plain"]

    control_file(tmp_path, "ICBC").unlink()
    await eventually(lambda: bank.servicer.faults.query_batches)
    messages, code, _ = await exchange_batches(stub, [[of(ZHANG, "restored")]])
    assert code == grpc.StatusCode.OK
    assert [a.query_id for a in answers_of(messages)] == ["restored"]


def test_query_batches_knob_parses_strictly() -> None:
    assert FaultSettings().query_batches is True
    assert FaultSettings.parse(["query_batches=0"]).query_batches is False
    assert FaultSettings.parse(["query_batches=yes"]).query_batches is True
    with pytest.raises(ValueError, match="query_batches"):
        FaultSettings.parse(["query_batches=sometimes"])
