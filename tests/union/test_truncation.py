"""A bank that truncates its answers is retried, then FAILED at once: it never holds a report.

The bank contract: an answer without a summary, or whose summary's count differs from the cards
that came, is truncated; so is a stream that ends, or breaks off, before its summary. Such an
answer is retried with backoff like any failed call, and a bank still truncating after
OrchestratorPolicy.truncated_answer_attempts is recorded FAILED as soon as that attempt ends,
where it used to be retried until the lookup's deadline and reported as NO_RESPONSE, holding
the whole report (24 hours by default). Every way of truncating is covered, on every way the
union asks (a QueryBatchSession, a QuerySession, one QueryCards call per query).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from cardlookup.v1 import card_lookup_service_pb2 as pb

from clients.client import TERMS_VERSION
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.union.domain.banks import BankCallFailed
from tests.bank.test_query_session import eventually
from tests.conftest import ZHANG, UnionFactory, run_lookup, verified_client

# Long enough that a report written before it can only come from the truncating banks being
# FAILED: were they retried until the deadline, the watch would time out first.
NEVER = timedelta(hours=1)

TRUNCATING = {
    # Batched session (the default way).
    "ICBC": FaultSettings(truncate="omit_summary"),
    "CMB": FaultSettings(truncate="wrong_count"),
    # The bank ends the session OK with the query unanswered.
    "HXB": FaultSettings(die_after_records=0, die_mode="end"),
    # QuerySession, one query a message.
    "CCB": FaultSettings(query_batches=False, truncate="omit_summary"),
    # One QueryCards call per query: no summary, a wrong count, a clean end before the summary,
    # and a stream that breaks off (UNAVAILABLE) after some of ZHANG's cards.
    "BOC": FaultSettings(query_session=False, truncate="omit_summary"),
    "ABC": FaultSettings(query_session=False, truncate="wrong_count"),
    "PSBC": FaultSettings(query_session=False, die_after_records=0, die_mode="end"),
}


def outcomes(report: pb.Report) -> dict[str, int]:
    return {s.bank_code: s.outcome for s in report.bank_summaries}


async def test_truncating_banks_are_failed_after_the_configured_attempts(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    for code, faults in TRUNCATING.items():
        banks[code].servicer.faults = faults
    union = await make_union(orchestration={"lookup_deadline": NEVER, "truncated_answer_attempts": 3})
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
    result = outcomes(report)
    assert {code: result[code] for code in TRUNCATING} == dict.fromkeys(TRUNCATING, pb.BANK_OUTCOME_FAILED)
    assert all(v == pb.BANK_OUTCOME_ANSWERED for k, v in result.items() if k not in TRUNCATING)
    progress = {b.bank_code: b for b in events[-1].lookup.bank_progress}
    for code in TRUNCATING:
        # Retried with backoff like any failed call, and given up on exactly at the limit.
        assert progress[code].attempt_count == 3, code
        assert "truncated" in progress[code].failure_reason, code
    # None of the truncated answers' cards are in the report; every other bank's are.
    assert {c.bank_code for c in report.cards}.isdisjoint(TRUNCATING)
    assert report.total_card_count == 0  # ZHANG's cards are all at truncating banks


async def test_a_stream_that_breaks_off_after_some_records_is_truncated(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    # ICBC holds two of ZHANG's cards: the stream sends one, then fails UNAVAILABLE.
    banks["ICBC"].servicer.faults = FaultSettings(query_session=False, die_after_records=1, die_mode="abort")
    union = await make_union(orchestration={"lookup_deadline": NEVER, "truncated_answer_attempts": 2})
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
    assert outcomes(report)["ICBC"] == pb.BANK_OUTCOME_FAILED
    icbc = next(b for b in events[-1].lookup.bank_progress if b.bank_code == "ICBC")
    assert icbc.attempt_count == 2
    assert "broke after 1 records" in icbc.failure_reason
    assert {c.bank_code for c in report.cards} == {"CMB", "CCB"}


async def test_a_bank_that_stops_truncating_is_answered(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(truncate="wrong_count")
    union = await make_union(orchestration={"lookup_deadline": NEVER, "truncated_answer_attempts": 1000})
    client = await verified_client(union, ZHANG)
    async with client:
        lookup = await client.create_lookup(consent_terms_version=TERMS_VERSION)
        for _ in range(400):  # generous: a loaded CI machine schedules retries late
            current = await client.get_lookup(lookup.name)
            icbc = next(b for b in current.bank_progress if b.bank_code == "ICBC")
            if icbc.attempt_count >= 2:
                break
            await asyncio.sleep(0.05)
        assert icbc.outcome == pb.BANK_OUTCOME_PENDING
        assert "truncated" in icbc.failure_reason
        banks["ICBC"].servicer.faults = FaultSettings()
        events = [e async for e in client.watch_lookup(lookup.name, stream_timeout=60)]
        report = await client.get_report(events[-1].lookup.report)
    assert set(outcomes(report).values()) == {pb.BANK_OUTCOME_ANSWERED}
    assert sum(1 for c in report.cards if c.bank_code == "ICBC") == 2


async def test_a_session_the_union_closes_did_not_truncate_its_queries(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    """Shutting the union down ends its streams with queries on them: those count as neither
    answered nor truncated (a truncation counts towards failing the bank)."""
    banks["ICBC"].servicer.faults = FaultSettings(latency_ms=60_000)
    union = await make_union()
    icbc = next(bank for bank in await union.store.list_banks() if bank.code == "ICBC")
    asked = asyncio.create_task(
        union.gateway.query_cards(icbc, "q-closing", ZHANG.resident_id_number, ZHANG.name, call_timeout=60)
    )
    await eventually(lambda: banks["ICBC"].servicer.session_received() == [1])
    await union.gateway.close()
    with pytest.raises(BankCallFailed) as failed:
        await asked
    assert failed.value.retryable
    assert not failed.value.truncated
