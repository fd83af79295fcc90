"""ListLookups: a person finds their way back to their own lookups, newest first, page by page;
never anyone else's, and never one whose report expired, was deleted or purged."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cardlookup.v1 import card_lookup_service_pb2 as pb

from clients.client import TERMS_VERSION, CardLookupError
from server.union.clock import FakeClock
from server.union.domain.identity import IdentityPolicy
from tests.conftest import LI, ZHANG, UnionFactory, run_lookup, verified_client


async def test_list_lookups_is_owner_only_paged_and_forgets_expired_reports(make_union: UnionFactory) -> None:
    clock = FakeClock(datetime(2026, 11, 27, 2, 0, tzinfo=UTC))
    union = await make_union(
        clock=clock,
        identity=IdentityPolicy(session_ttl=timedelta(days=30)),
        lookups={"requery_cooldown": timedelta(0)},
    )
    zhang = await verified_client(union, ZHANG)
    li = await verified_client(union, LI)
    async with zhang, li:
        completed = []
        for _ in range(3):
            _, report = await run_lookup(zhang)
            completed.append(report)
            clock.advance(timedelta(minutes=1))
        _, li_report = await run_lookup(li)

        await union.orchestrator.stop(0)  # the next lookup stays in flight
        running = await zhang.create_lookup(request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION)

        first = await zhang.list_lookups(page_size=2)
        assert [lookup.name for lookup in first.lookups] == [running.name, completed[2].lookup]
        assert first.lookups[0].state == pb.LOOKUP_STATE_RUNNING
        assert len(first.lookups[0].bank_progress) == 16
        assert first.lookups[1].state == pb.LOOKUP_STATE_COMPLETED
        assert first.lookups[1].report == completed[2].name
        assert first.next_page_token
        second = await zhang.list_lookups(page_size=2, page_token=first.next_page_token)
        assert [lookup.name for lookup in second.lookups] == [completed[1].lookup, completed[0].lookup]
        assert second.next_page_token == ""

        # Owner only: Li sees Li's lookup alone, and Zhang's page token is not Li's to use.
        assert [lookup.name for lookup in (await li.list_lookups()).lookups] == [li_report.lookup]
        with pytest.raises(CardLookupError) as borrowed:
            await li.list_lookups(page_token=first.next_page_token)
        assert borrowed.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(CardLookupError) as negative:
            await zhang.list_lookups(page_size=-1)
        assert negative.value.field_violations == [("page_size", "must not be negative")]

        # The list is in the person's own trail, like every other read.
        trail = (await zhang.my_audit_events(page_size=200)).events
        assert sum(event.action == "lookup.list" for event in trail) == 3

        # A deleted report takes its lookup out of the list.
        await zhang.delete_report(completed[0].name)
        names = [lookup.name for lookup in (await zhang.list_lookups()).lookups]
        assert names == [running.name, completed[2].lookup, completed[1].lookup]

        union.orchestrator.start()
        async for event in zhang.watch_lookup(running.name, stream_timeout=60):
            last = event
        assert last.report_ready

        # Once the reports expire their lookups are not listed, before the purge and after it.
        clock.advance(timedelta(days=9))
        assert list((await zhang.list_lookups()).lookups) == []
        assert list((await li.list_lookups()).lookups) == []
        assert await union.store.purge_expired_reports(clock.now()) == 4
        assert list((await zhang.list_lookups()).lookups) == []
