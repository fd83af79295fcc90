"""Reports expire at the end of the 7th natural day (Asia/Shanghai) and purge removes them for good."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from sqlalchemy import func, select

from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError
from server.union.clock import FakeClock
from server.union.domain.identity import IdentityPolicy
from server.union.domain.retention import report_expire_time
from server.union.storage.models import FoundCardRow, LookupRow, ReportRow
from tests.conftest import ZHANG, UnionFactory, run_lookup, verified_client

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_expiry_is_the_end_of_the_seventh_natural_day() -> None:
    generated = datetime(2026, 11, 27, 23, 59, tzinfo=SHANGHAI)
    assert report_expire_time(generated) == datetime(2026, 12, 5, 0, 0, tzinfo=SHANGHAI)
    # Calendar days in Shanghai, not 24-hour periods in UTC: 00:30 local is still the 27th there.
    just_after_midnight = datetime(2026, 11, 27, 0, 30, tzinfo=SHANGHAI)
    assert report_expire_time(just_after_midnight) == datetime(2026, 12, 5, 0, 0, tzinfo=SHANGHAI)
    assert report_expire_time(generated, timezone="UTC", days=1) == datetime(2026, 11, 29, tzinfo=UTC)


async def test_report_served_through_day_seven_then_never_and_purged(make_union: UnionFactory) -> None:
    clock = FakeClock(datetime(2026, 11, 27, 15, 0, tzinfo=SHANGHAI).astimezone(UTC))
    # A long session, so the same client can come back days later.
    union = await make_union(clock=clock, identity=IdentityPolicy(session_ttl=timedelta(days=30)))
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
        assert report.expire_time.ToDatetime(tzinfo=UTC) == datetime(2026, 12, 5, tzinfo=SHANGHAI)

        clock.set(datetime(2026, 12, 4, 23, 59, 59, tzinfo=SHANGHAI).astimezone(UTC))
        assert (await client.get_report(report.name)).name == report.name
        assert len((await client.list_reports()).reports) == 1

        clock.set(datetime(2026, 12, 5, 0, 0, 0, tzinfo=SHANGHAI).astimezone(UTC))
        with pytest.raises(CardLookupError) as expired:
            await client.get_report(report.name)
        assert expired.value.code == grpc.StatusCode.NOT_FOUND
        assert (await client.list_reports()).reports == []

        # Before the purge the rows are still there (never served); after it they are gone.
        def counts() -> tuple[int, int]:
            with union.store.engine.connect() as connection:
                reports = connection.scalar(select(func.count()).select_from(ReportRow))
                cards = connection.scalar(select(func.count()).select_from(FoundCardRow))
            return int(reports or 0), int(cards or 0)

        assert counts() == (1, 5)
        assert await union.store.purge_expired_reports(clock.now()) == 1
        assert counts() == (0, 0)


async def test_lookup_forgets_the_id_number_when_final(make_union: UnionFactory) -> None:
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        await union.orchestrator.stop(0)  # hold the lookup in flight
        lookup = await client.create_lookup(consent_terms_version=TERMS_VERSION)
        with union.store.engine.connect() as connection:
            sealed = connection.scalar(select(LookupRow.sealed_identity))
        assert sealed  # kept, encrypted, while in flight
        assert ZHANG.resident_id_number not in sealed
        union.orchestrator.start()
        async for event in client.watch_lookup(lookup.name):
            last = event
        assert last.report_ready
        with union.store.engine.connect() as connection:
            assert connection.scalar(select(LookupRow.sealed_identity)) is None


async def test_quota_slots_are_kept_for_the_identity_policys_own_window(make_union: UnionFactory) -> None:
    """The purge keeps a quota's slots as long as its window: a union configured with a two-hour
    window (here built directly, as tests, the demo and the bench do) must not forget an SMS sent
    90 minutes ago, or the limit would quietly loosen."""
    clock = FakeClock(datetime(2026, 11, 27, 9, 0, tzinfo=UTC))
    union = await make_union(
        clock=clock, identity=IdentityPolicy(start_window=timedelta(hours=2), max_starts_per_window=1)
    )
    async with CardLookupClient(union.address) as client:
        await client.start_verification(ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number)
        clock.advance(timedelta(minutes=90))
        await union.retention.sweep(clock.now())
        with pytest.raises(CardLookupError) as limited:
            await client.start_verification(ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number)
        assert limited.value.reason == "VERIFICATION_RATE_LIMITED"

        clock.advance(timedelta(minutes=31))
        await union.retention.sweep(clock.now())
        await client.start_verification(ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number)
