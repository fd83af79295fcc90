"""Faulty banks and union restarts still end in exactly one correct report (invariants 4 and 5)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
from cardlookup.v1 import card_lookup_service_pb2 as pb
from sqlalchemy import func, select

from clients.client import TERMS_VERSION
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.union.storage.models import ReportRow
from tests.conftest import ZHANG, UnionFactory, run_lookup, verified_client


def outcomes(report: pb.Report) -> dict[str, int]:
    return {s.bank_code: s.outcome for s in report.bank_summaries}


async def test_bank_down_for_the_whole_deadline(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["CMB"].servicer.faults = FaultSettings(outage=True)
    union = await make_union(orchestration={"lookup_deadline": timedelta(seconds=2)})
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
    result = outcomes(report)
    assert result["CMB"] == pb.BANK_OUTCOME_NO_RESPONSE
    assert all(v == pb.BANK_OUTCOME_ANSWERED for k, v in result.items() if k != "CMB")
    # The partial report still has every other bank's cards, and none of CMB's.
    assert report.total_card_count == 3
    assert {c.bank_code for c in report.cards} == {"ICBC", "CCB"}


async def test_bank_down_then_back_is_retried(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(outage=True)
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        lookup = await client.create_lookup(consent_terms_version=TERMS_VERSION)
        for _ in range(400):  # generous: a loaded CI machine schedules retries late
            current = await client.get_lookup(lookup.name)
            icbc = next(b for b in current.bank_progress if b.bank_code == "ICBC")
            if icbc.attempt_count >= 2:
                break
            await asyncio.sleep(0.05)
        assert icbc.attempt_count >= 2
        assert icbc.outcome == pb.BANK_OUTCOME_PENDING
        banks["ICBC"].servicer.faults = FaultSettings()
        events = [e async for e in client.watch_lookup(lookup.name)]
        report = await client.get_report(events[-1].lookup.report)
    assert outcomes(report)["ICBC"] == pb.BANK_OUTCOME_ANSWERED
    icbc_progress = next(b for b in events[-1].lookup.bank_progress if b.bank_code == "ICBC")
    assert icbc_progress.attempt_count >= 3
    assert report.total_card_count == 5


async def test_lying_banks_fail_alone(make_union: UnionFactory, banks: dict[str, RunningBank]) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(lie="wrong_bank")
    banks["CMB"].servicer.faults = FaultSettings(lie="long_last_four")
    banks["CCB"].servicer.faults = FaultSettings(lie="unknown_enum")
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
    result = outcomes(report)
    assert result["ICBC"] == result["CMB"] == result["CCB"] == pb.BANK_OUTCOME_FAILED
    assert sum(1 for v in result.values() if v == pb.BANK_OUTCOME_ANSWERED) == 13
    assert report.total_card_count == 0
    assert list(report.cards) == []
    reasons = {b.bank_code: b.failure_reason for b in events[-1].lookup.bank_progress}
    assert "another bank" in reasons["ICBC"]
    assert "last-four" in reasons["CMB"]
    assert "unknown" in reasons["CCB"]


async def test_an_impossible_open_time_fails_that_bank_at_once(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    """A date out of the Timestamp range used to raise where no bank failure was expected: the task
    was retried until the lookup's deadline."""
    banks["ICBC"].servicer.faults = FaultSettings(lie="impossible_open_time")
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
    result = outcomes(report)
    assert result["ICBC"] == pb.BANK_OUTCOME_FAILED
    assert sum(1 for v in result.values() if v == pb.BANK_OUTCOME_ANSWERED) == 15
    icbc = next(b for b in events[-1].lookup.bank_progress if b.bank_code == "ICBC")
    assert "open time" in icbc.failure_reason


async def test_truncated_and_dying_streams(make_union: UnionFactory, banks: dict[str, RunningBank]) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(truncate="omit_summary")
    banks["CMB"].servicer.faults = FaultSettings(truncate="wrong_count")
    banks["CCB"].servicer.faults = FaultSettings(die_after_records=0, die_mode="abort")
    union = await make_union(orchestration={"lookup_deadline": timedelta(seconds=10)})
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
    result = outcomes(report)
    # A truncated answer is retried a few times, then the bank is FAILED (not silent at the
    # deadline); a bank whose connection drops before it answers anything is silence.
    assert result["ICBC"] == result["CMB"] == pb.BANK_OUTCOME_FAILED
    assert result["CCB"] == pb.BANK_OUTCOME_NO_RESPONSE
    reasons = {b.bank_code: b.failure_reason for b in events[-1].lookup.bank_progress}
    assert "truncated" in reasons["ICBC"]
    assert "truncated" in reasons["CMB"]
    assert report.total_card_count == 0


async def test_restart_mid_lookup_resumes_and_reports_once(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["CMB"].servicer.faults = FaultSettings(outage=True)
    first = await make_union()
    client = await verified_client(first, ZHANG)
    async with client:
        lookup = await client.create_lookup(request_id="restart-me", consent_terms_version=TERMS_VERSION)
        for _ in range(100):
            current = await client.get_lookup(lookup.name)
            done = [b for b in current.bank_progress if b.outcome != pb.BANK_OUTCOME_PENDING]
            if len(done) == 15:
                break
            await asyncio.sleep(0.05)
        assert len(done) == 15
    await first.stop(0)

    banks["CMB"].servicer.faults = FaultSettings()
    second = await make_union()  # same data directory, keys and database: a restarted union
    client = await verified_client(second, ZHANG)
    async with client:
        # The session from before the restart is still valid too (same keys), and the lookup is found.
        events = [e async for e in client.watch_lookup(lookup.name)]
        report = await client.get_report(events[-1].lookup.report)
        assert (
            await client.create_lookup(request_id="restart-me", consent_terms_version=TERMS_VERSION)
        ).name == lookup.name
    assert all(v == pb.BANK_OUTCOME_ANSWERED for v in outcomes(report).values())
    assert report.total_card_count == 5
    with second.store.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(ReportRow)) == 1


async def test_health_reports_serving(make_union: UnionFactory) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    union = await make_union()
    async with grpc.aio.insecure_channel(union.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cardlookup.v1.CardLookupService"):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_slow_and_hung_banks_do_not_delay_the_others(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(latency_ms=3_600_000)  # hangs (for an hour)
    banks["CMB"].servicer.faults = FaultSettings(latency_ms=5_000)  # slower than the 2 s call deadline
    union = await make_union(orchestration={"lookup_deadline": timedelta(seconds=4)})
    client = await verified_client(union, ZHANG)
    async with client:
        lookup = await client.create_lookup(consent_terms_version=TERMS_VERSION)
        all_healthy_answered = None
        last = None
        async for event in client.watch_lookup(lookup.name):
            last = event
            answered = [b for b in event.lookup.bank_progress if b.outcome == pb.BANK_OUTCOME_ANSWERED]
            if all_healthy_answered is None and len(answered) == 14:
                all_healthy_answered = event.lookup
        assert last is not None
        report = await client.get_report(last.lookup.report)
    # No added delay, shown by order rather than by the clock: every healthy bank's answer was in the
    # stream while the slow and hung banks were still on their first call, before even its deadline.
    assert all_healthy_answered is not None
    slow = {b.bank_code: b for b in all_healthy_answered.bank_progress if b.bank_code in ("ICBC", "CMB")}
    assert all(b.outcome == pb.BANK_OUTCOME_PENDING for b in slow.values())
    assert all(b.attempt_count == 1 and not b.failure_reason for b in slow.values())
    result = outcomes(report)
    assert result["ICBC"] == result["CMB"] == pb.BANK_OUTCOME_NO_RESPONSE
    progress = {b.bank_code: b for b in last.lookup.bank_progress}
    assert progress["CMB"].attempt_count >= 2  # the deadline-exceeded call was retried
    assert "DEADLINE_EXCEEDED" in progress["CMB"].failure_reason
