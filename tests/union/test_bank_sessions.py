"""The union's bank links: one QueryBatchSession stream per bank, a QuerySession where a bank has no
batches, QueryCards where it has neither.

The per-bank fault tests (test_durability.py) run over sessions already; these pin what is particular
to them: negotiation per bank, a stream that breaks or turns UNIMPLEMENTED while queries are in flight,
many lookups sharing the streams, and queries that wait together going in one message.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from cardlookup.v1 import card_lookup_service_pb2 as pb

from clients.client import TERMS_VERSION
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import people
from server.union.bank_gateway import GrpcBankGateway, _QuerySessionLink
from server.union.domain.banks import BankCallFailed
from server.union.domain.model import Bank
from server.union.union_server import UnionServer
from tests.conftest import LI, LIU, SEED, SIZE, ZHANG, UnionFactory, run_lookup, verified_client


def outcomes(report: pb.Report) -> dict[str, int]:
    return {s.bank_code: s.outcome for s in report.bank_summaries}


async def _bank(union: UnionServer, code: str) -> Bank:
    return next(bank for bank in await union.store.list_banks() if bank.code == code)


def _gateway(union: UnionServer) -> GrpcBankGateway:
    assert isinstance(union.gateway, GrpcBankGateway)
    return union.gateway


async def test_a_bank_without_sessions_is_asked_per_call(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(query_session=False)  # an older bank
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
    assert set(outcomes(report).values()) == {pb.BANK_OUTCOME_ANSWERED}
    assert {c.bank_code for c in report.cards} == {"ICBC", "CMB", "CCB"}
    assert report.total_card_count == 5
    gateway = _gateway(union)
    assert not gateway.uses_session(await _bank(union, "ICBC"))
    assert not gateway.uses_batches(await _bank(union, "ICBC"))
    assert gateway.uses_session(await _bank(union, "CMB"))
    assert gateway.uses_batches(await _bank(union, "CMB"))


async def test_a_bank_without_batches_is_asked_one_query_a_message(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(query_batches=False)  # QuerySession only
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
    assert set(outcomes(report).values()) == {pb.BANK_OUTCOME_ANSWERED}
    assert sum(1 for c in report.cards if c.bank_code == "ICBC") == 2
    gateway = _gateway(union)
    icbc = await _bank(union, "ICBC")
    assert gateway.uses_session(icbc)
    assert not gateway.uses_batches(icbc)
    assert banks["ICBC"].servicer.session_messages() == [1]  # its QuerySession stream, still open


async def test_a_broken_stream_is_reopened_and_its_queries_retried(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    # The stream dies at the first answer; the attempt fails as retryable and is retried (on a new
    # stream) once the bank is healthy again.
    banks["ICBC"].servicer.faults = FaultSettings(die_after_records=0, die_mode="abort")
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        lookup = await client.create_lookup(consent_terms_version=TERMS_VERSION)
        for _ in range(400):
            current = await client.get_lookup(lookup.name)
            icbc = next(b for b in current.bank_progress if b.bank_code == "ICBC")
            if icbc.attempt_count >= 2:
                break
            await asyncio.sleep(0.05)
        assert icbc.outcome == pb.BANK_OUTCOME_PENDING
        assert "session lost: UNAVAILABLE" in icbc.failure_reason
        banks["ICBC"].servicer.faults = FaultSettings()
        events = [e async for e in client.watch_lookup(lookup.name)]
        report = await client.get_report(events[-1].lookup.report)
    assert outcomes(report)["ICBC"] == pb.BANK_OUTCOME_ANSWERED
    assert sum(1 for c in report.cards if c.bank_code == "ICBC") == 2


async def test_a_bank_that_drops_sessions_while_running_is_asked_per_call(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    union = await make_union()
    zhang = await verified_client(union, ZHANG)
    async with zhang:
        await run_lookup(zhang)  # ICBC's stream is open now
    icbc = await _bank(union, "ICBC")
    assert _gateway(union).uses_session(icbc)
    banks["ICBC"].servicer.faults = FaultSettings(query_session=False)  # "restarted as an older version"
    liu = await verified_client(union, LIU)
    async with liu:
        _, report = await run_lookup(liu)
    assert set(outcomes(report).values()) == {pb.BANK_OUTCOME_ANSWERED}
    assert sum(1 for c in report.cards if c.bank_code == "ICBC") == 55
    assert not _gateway(union).uses_session(icbc)


async def test_a_bank_that_drops_batches_while_running_is_asked_over_query_session(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    union = await make_union()
    zhang = await verified_client(union, ZHANG)
    async with zhang:
        await run_lookup(zhang)  # ICBC's batched stream is open now
    icbc = await _bank(union, "ICBC")
    assert _gateway(union).uses_batches(icbc)
    banks["ICBC"].servicer.faults = FaultSettings(query_batches=False)  # "restarted without batches"
    liu = await verified_client(union, LIU)
    async with liu:
        _, report = await run_lookup(liu)
    assert set(outcomes(report).values()) == {pb.BANK_OUTCOME_ANSWERED}
    assert sum(1 for c in report.cards if c.bank_code == "ICBC") == 55
    assert _gateway(union).uses_session(icbc)
    assert not _gateway(union).uses_batches(icbc)


async def test_queries_waiting_together_go_in_one_message(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    """Twenty queries asked at once: each answered as QueryCards would, in fewer messages than
    queries (how many depends on when the stream is free to write; never one each)."""
    union = await make_union()
    gateway = _gateway(union)
    icbc = await _bank(union, "ICBC")
    crowd = list(people(SEED, SIZE))[:20]
    answers = await asyncio.gather(
        *(
            gateway.query_cards(icbc, uuid.uuid4().hex, person.resident_id_number, person.name, 10.0)
            for person in crowd
        )
    )
    for person, cards in zip(crowd, answers, strict=True):
        expected = banks["ICBC"].store.find_cards(person.resident_id_number, person.name)
        assert sorted(card.bank_card_ref for card in cards) == sorted(card.card_ref for card in expected)
    assert sum(len(cards) for cards in answers) > 0
    assert banks["ICBC"].servicer.session_received() == [20]
    [messages] = banks["ICBC"].servicer.session_messages()
    assert messages < 20


async def test_concurrent_lookups_share_the_streams(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    union = await make_union()
    people = [ZHANG, LI, LIU]
    clients = [await verified_client(union, person) for person in people]
    try:
        results = await asyncio.gather(*(run_lookup(client) for client in clients))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    for _, report in results:
        assert set(outcomes(report).values()) == {pb.BANK_OUTCOME_ANSWERED}
    assert [report.total_card_count for _, report in results] == [5, 4, 56]
    gateway = _gateway(union)
    assert all(gateway.uses_batches(bank) for bank in await union.store.list_banks())


# --- the link's deadlines and places, against one bank directly (no union) ---------------------------

AN_HOUR_MS = 3_600_000


def _icbc(banks: dict[str, RunningBank]) -> Bank:
    return Bank("ICBC", "中国工商银行", "ICBC", banks["ICBC"].address, True, 0)


async def test_a_query_past_its_deadline_fails_and_the_others_are_answered(
    banks: dict[str, RunningBank],
) -> None:
    gateway = GrpcBankGateway()
    icbc = _icbc(banks)
    try:
        # Deadlines in decreasing order: each query needs the link's timer sooner than the last.
        await gateway.query_cards(icbc, "warm-up", ZHANG.resident_id_number, ZHANG.name, 120.0)
        banks["ICBC"].servicer.faults = FaultSettings(latency_ms=AN_HOUR_MS)
        patient = asyncio.create_task(
            gateway.query_cards(icbc, "q0", ZHANG.resident_id_number, ZHANG.name, 60)
        )
        hung = asyncio.create_task(gateway.query_cards(icbc, "q1", LIU.resident_id_number, LIU.name, 0.2))
        with pytest.raises(BankCallFailed, match="DEADLINE_EXCEEDED") as caught:
            await hung
        assert caught.value.retryable
        # At its own deadline, not with a later one: the minute-long query is still waiting.
        assert not patient.done()
        patient.cancel()
        # The same query id again (a retry), now answered: the first attempt's deadline, long
        # passed, must not fail it, and neither may the hung query that is still at the bank.
        banks["ICBC"].servicer.faults = FaultSettings()
        retried = await gateway.query_cards(icbc, "q1", LIU.resident_id_number, LIU.name, 10.0)
        assert len(retried) == 55
    finally:
        await gateway.close()


async def test_a_full_link_makes_a_query_wait_within_its_deadline(banks: dict[str, RunningBank]) -> None:
    gateway = GrpcBankGateway(max_outstanding_per_bank=1)
    icbc = _icbc(banks)
    try:
        banks["ICBC"].servicer.faults = FaultSettings(latency_ms=AN_HOUR_MS)
        holder = asyncio.create_task(
            gateway.query_cards(icbc, "holder", ZHANG.resident_id_number, ZHANG.name, 0.5)
        )
        await asyncio.sleep(0)  # the holder takes the one place
        with pytest.raises(BankCallFailed, match="DEADLINE_EXCEEDED"):
            await gateway.query_cards(icbc, "waiter", LIU.resident_id_number, LIU.name, 0.1)
        with pytest.raises(BankCallFailed, match="DEADLINE_EXCEEDED"):
            await holder
        # The place is free again: the next query goes through once the bank answers.
        banks["ICBC"].servicer.faults = FaultSettings()
        assert len(await gateway.query_cards(icbc, "after", LIU.resident_id_number, LIU.name, 10.0)) == 55
    finally:
        await gateway.close()


async def test_a_waiting_query_takes_the_place_a_finished_one_left(banks: dict[str, RunningBank]) -> None:
    gateway = GrpcBankGateway(max_outstanding_per_bank=2)
    icbc = _icbc(banks)
    try:
        crowd = list(people(SEED, SIZE))[:12]
        answers = await asyncio.gather(
            *(
                gateway.query_cards(icbc, f"q{i}", person.resident_id_number, person.name, 10.0)
                for i, person in enumerate(crowd)
            )
        )
        for person, cards in zip(crowd, answers, strict=True):
            assert len(cards) == len(banks["ICBC"].store.find_cards(person.resident_id_number, person.name))
    finally:
        await gateway.close()


async def test_a_place_handed_to_a_query_that_gave_up_goes_to_the_next() -> None:
    """A query woken for a free place but cancelled (its deadline) before it ran passes the place
    on; otherwise the next one would wait out its own deadline beside a free place."""
    async with grpc.aio.insecure_channel("127.0.0.1:9") as channel:  # never called
        link = _QuerySessionLink(channel, "ICBC", max_outstanding=1)
        link._in_flight = 1  # the one place is taken
        far = asyncio.get_running_loop().time() + 60
        first = asyncio.create_task(link._wait_for_place(far))
        second = asyncio.create_task(link._wait_for_place(far))
        await asyncio.sleep(0)
        assert not first.done()
        assert not second.done()
        link._in_flight = 0
        link._hand_on_place()  # wakes the first...
        first.cancel()  # ...which gives up before it runs
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, timeout=10)  # the second has the place (bounded, not timed)
        await link.close()
