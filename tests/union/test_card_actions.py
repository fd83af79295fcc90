"""Beyond the original: close cards, flag a card as not mine, the audit trail, the report-ready SMS."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_action_service_pb2_grpc as action_grpc
from cardlookup.v1 import card_lookup_service_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select

from clients.client import CardLookupClient, CardLookupError
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import DEMO_PEOPLE, cards_of
from server.union.domain.card_actions import CardActionPolicy
from server.union.domain.orchestrator import ANNOUNCE_INTERVAL
from server.union.notify import report_ready_text
from server.union.storage.models import AuditEventRow
from server.union.union_server import UnionServer
from tests.conftest import LI, LIU, SEED, ZHANG, UnionFactory, run_lookup, verified_client

C = grpc.StatusCode


class Actions:
    """A tiny typed wrapper over CardActionService for these tests."""

    def __init__(self, union: UnionServer, client: CardLookupClient) -> None:
        self._channel = grpc.aio.insecure_channel(union.address)
        self._stub = action_grpc.CardActionServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {client.session_token}"),)

    async def close(
        self, report: str, refs: list[str], request_id: str | None = None
    ) -> action_pb.CardClosure:
        request = action_pb.CreateCardClosureRequest(
            request_id=request_id or uuid.uuid4().hex, report=report, card_refs=refs
        )
        return (await self._stub.CreateCardClosure(request, metadata=self._metadata, timeout=10)).closure

    async def get(self, name: str) -> action_pb.CardClosure:
        request = action_pb.GetCardClosureRequest(name=name)
        return (await self._stub.GetCardClosure(request, metadata=self._metadata, timeout=10)).closure

    async def flag(self, report: str, ref: str, request_id: str | None = None) -> action_pb.CardFlag:
        request = action_pb.FlagCardNotMineRequest(
            request_id=request_id or uuid.uuid4().hex, report=report, card_ref=ref
        )
        return (await self._stub.FlagCardNotMine(request, metadata=self._metadata, timeout=10)).flag

    async def audit(self) -> list[action_pb.AuditEvent]:
        response = await self._stub.ListMyAuditEvents(
            action_pb.ListMyAuditEventsRequest(page_size=500), metadata=self._metadata, timeout=10
        )
        return list(response.events)

    async def aclose(self) -> None:
        await self._channel.close()


def by_last_four(report: pb.Report) -> dict[str, pb.ReportCard]:
    return {card.masked_number[-4:]: card for card in report.cards}


async def test_closure_outcomes_and_the_next_lookup(make_union: UnionFactory) -> None:
    union = await make_union(lookups={"requery_cooldown": timedelta(0)})
    client = await verified_client(union, ZHANG)
    actions = Actions(union, client)
    try:
        _, report = await run_lookup(client)
        cards = by_last_four(report)
        refs = [cards[last].card_ref for last in ("1472", "2353", "3666", "2844", "0918")]
        closure = await actions.close(report.name, refs, request_id="close-all")
        states = {item.masked_number[-4:]: item for item in closure.items}
        assert states["1472"].state == action_pb.CARD_CLOSURE_STATE_CLOSED  # ICBC debit, no funds
        assert states["2844"].state == action_pb.CARD_CLOSURE_STATE_CLOSED  # CMB dormant debit
        assert states["2353"].state == action_pb.CARD_CLOSURE_STATE_BRANCH_VISIT_REQUIRED  # ICBC credit owed
        assert "3,280.00" in states["2353"].reason
        assert (
            states["3666"].state == action_pb.CARD_CLOSURE_STATE_BRANCH_VISIT_REQUIRED
        )  # CMB debit with funds
        assert states["0918"].state == action_pb.CARD_CLOSURE_STATE_SCHEDULED  # CCB credit, nothing owed
        assert all(item.ticket_id for item in closure.items)

        # Idempotent: the same request_id returns the same closure and the banks' same tickets.
        again = await actions.close(report.name, refs, request_id="close-all")
        assert again.name == closure.name
        assert [i.ticket_id for i in again.items] == [i.ticket_id for i in closure.items]
        assert (await actions.get(closure.name)).items == closure.items

        # The report shows each card's latest closure.
        shown = by_last_four(await client.get_report(report.name))
        assert shown["1472"].closure.state == action_pb.CARD_CLOSURE_STATE_CLOSED

        # Closed cards no longer appear in the next lookup; the others do.
        _, next_report = await run_lookup(client)
        assert set(by_last_four(next_report)) == {"2353", "3666", "0918"}
    finally:
        await actions.aclose()
        await client.close()


async def test_rejected_closure_and_bad_requests(union: UnionServer) -> None:
    liu = await verified_client(union, LIU)
    actions = Actions(union, liu)
    zhang = await verified_client(union, ZHANG)
    try:
        _, report = await run_lookup(liu)
        frozen = next(card for card in report.cards if card.status == pb.CARD_STATUS_FROZEN)
        closure = await actions.close(report.name, [frozen.card_ref])
        assert closure.items[0].state == action_pb.CARD_CLOSURE_STATE_REJECTED
        assert "frozen" in closure.items[0].reason

        with pytest.raises(grpc.aio.AioRpcError) as not_in_report:
            await actions.close(report.name, ["cnotacard"])
        assert not_in_report.value.code() == C.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as repeated:
            await actions.close(report.name, [frozen.card_ref, frozen.card_ref])
        assert repeated.value.code() == C.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await actions.close(report.name, [])
        assert empty.value.code() == C.INVALID_ARGUMENT

        # Someone else's report is NOT_FOUND, for closures, flags and closure reads alike.
        stranger = Actions(union, zhang)
        try:
            for call in (
                stranger.close(report.name, [frozen.card_ref]),
                stranger.flag(report.name, frozen.card_ref),
                stranger.get(closure.name),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as foreign:
                    await call
                assert foreign.value.code() == C.NOT_FOUND
        finally:
            await stranger.aclose()
    finally:
        await actions.aclose()
        await liu.close()
        await zhang.close()


async def test_not_mine_freezes_and_the_report_shows_the_case(make_union: UnionFactory) -> None:
    union = await make_union(lookups={"requery_cooldown": timedelta(0)})
    client = await verified_client(union, LI)
    actions = Actions(union, client)
    try:
        _, report = await run_lookup(client)
        card = next(c for c in report.cards if c.bank_code == "CMB")
        flag = await actions.flag(report.name, card.card_ref, request_id="not-mine-1")
        assert flag.state == action_pb.CARD_FLAG_STATE_FROZEN
        assert flag.case_number.startswith("FR-CMB-")
        # Flagging the same card again (any request id) returns the same flag.
        assert (await actions.flag(report.name, card.card_ref)).case_number == flag.case_number

        shown = next(c for c in (await client.get_report(report.name)).cards if c.card_ref == card.card_ref)
        assert shown.not_mine_flag.case_number == flag.case_number
        assert shown.not_mine_flag.state == action_pb.CARD_FLAG_STATE_FROZEN

        _, next_report = await run_lookup(client)
        cmb = next(c for c in next_report.cards if c.bank_code == "CMB")
        assert cmb.status == pb.CARD_STATUS_FROZEN
    finally:
        await actions.aclose()
        await client.close()


async def test_closure_survives_a_restart(make_union: UnionFactory, banks: dict[str, RunningBank]) -> None:
    first = await make_union(card_actions=CardActionPolicy(answer_wait=timedelta(milliseconds=300)))
    client = await verified_client(first, ZHANG)
    actions = Actions(first, client)
    _, report = await run_lookup(client)
    icbc_debit = by_last_four(report)["1472"]
    banks["ICBC"].servicer.faults = FaultSettings(outage=True)
    closure = await actions.close(report.name, [icbc_debit.card_ref], request_id="across-restart")
    assert closure.items[0].state == action_pb.CARD_CLOSURE_STATE_PENDING
    await actions.aclose()
    await client.close()
    await first.stop(0)

    banks["ICBC"].servicer.faults = FaultSettings()
    second = await make_union()
    client = await verified_client(second, ZHANG)
    actions = Actions(second, client)
    try:
        for _ in range(400):  # generous for a loaded machine; the retry itself is due within a second
            closure = await actions.get(closure.name)
            if closure.items[0].state != action_pb.CARD_CLOSURE_STATE_PENDING:
                break
            await asyncio.sleep(0.05)
        assert closure.items[0].state == action_pb.CARD_CLOSURE_STATE_CLOSED
        assert closure.items[0].ticket_id.startswith("T-ICBC-")
    finally:
        await actions.aclose()
        await client.close()


async def test_audit_trail_without_pii_and_one_notification_per_report(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    actions = Actions(union, client)
    try:
        _, report = await run_lookup(client)
        card = report.cards[0]
        await actions.flag(report.name, card.card_ref)
        await actions.close(report.name, [report.cards[1].card_ref])

        # One "report ready" SMS for the one report, with no card data in it (before the report is
        # deleted: a deleted report's unsent announcement goes with it). Announcements go out
        # in batches (every ANNOUNCE_INTERVAL), so wait for it; then wait as long again for a second.
        def report_ready_messages() -> list[dict[str, str]]:
            outbox = [json.loads(line) for line in union.config.sms_sink_path.read_text().splitlines()]
            return [m for m in outbox if m["to"] == ZHANG.mobile_number and m["text"] == report_ready_text(7)]

        for _ in range(200):  # bounded by attempts: the outbox is a file, there is nothing to await
            if report_ready_messages():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * ANNOUNCE_INTERVAL)
        assert len(report_ready_messages()) == 1
        await client.delete_report(report.name)
        with pytest.raises(CardLookupError):
            await client.get_report(report.name)

        events = await actions.audit()
        seen = {(e.action, e.outcome.split(":")[0]) for e in events}
        for expected in [
            ("verification.start", "ok"),
            ("verification.complete", "ok"),
            ("lookup.create", "ok"),
            ("report.read", "ok"),
            ("report.read", "refused"),
            ("report.delete", "ok"),
            ("card.flag", "frozen"),
            ("card.close", "requested"),
        ]:
            assert expected in seen, expected
        actor = events[0].actor
        assert all(e.actor == actor for e in events)
        assert len(actor) == 64

        # Admins query by actor and time range; events outlive the deleted report.
        async with CardLookupClient(union.address, admin_token="test-admin-token") as admin:
            start = Timestamp()
            start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
            response = await admin.admin(
                "ListAuditEvents", admin_pb.ListAuditEventsRequest(actor=actor, start_time=start, page_size=3)
            )
            assert len(response.events) == 3
            assert response.next_page_token
            later = await admin.admin(
                "ListAuditEvents",
                admin_pb.ListAuditEventsRequest(
                    actor=actor, start_time=start, page_token=response.next_page_token
                ),
            )
            # The person's trail as the person read it, and then that read itself (audit.read).
            assert len(response.events) + len(later.events) == len(events) + 1
            assert response.events[0].action == "audit.read"  # newest first
            with pytest.raises(CardLookupError) as bad_actor:
                await admin.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest(actor="张伟"))
            assert bad_actor.value.code == C.INVALID_ARGUMENT

        # The raw table holds no names, ID numbers, mobile numbers or card numbers. (Not even the
        # last four digits would be a leak, but 4 digits also turn up by chance in timestamps and ids.)
        with union.store.engine.connect() as connection:
            raw = json.dumps([list(map(str, row)) for row in connection.execute(select(AuditEventRow))])
        forbidden = [ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number]
        forbidden += [c.number for c in cards_of(SEED, DEMO_PEOPLE[0].person)]
        assert [value for value in forbidden if value in raw] == []

    finally:
        await actions.aclose()
        await client.close()


async def test_closures_per_person_are_limited_exactly_under_a_burst(make_union: UnionFactory) -> None:
    """Each closure calls banks, and a new request_id makes a new one: 50 at once for one person
    get exactly the limit through, on SQLite and PostgreSQL alike; a retry of one of those is
    still answered (it makes nothing new), and nobody else is affected."""
    limit = 4
    union = await make_union(
        card_actions=CardActionPolicy(answer_wait=timedelta(0), max_closures_per_window=limit)
    )
    client = await verified_client(union, ZHANG)
    actions = Actions(union, client)
    try:
        _, report = await run_lookup(client)
        ref = report.cards[0].card_ref

        async def close(request_id: str) -> str:
            try:
                await actions.close(report.name, [ref], request_id=request_id)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return "OK"

        outcomes = await asyncio.gather(*(close(f"burst-{n}") for n in range(50)))
        assert outcomes.count("OK") == limit
        assert outcomes.count("RESOURCE_EXHAUSTED") == 50 - limit
        accepted = [n for n, outcome in enumerate(outcomes) if outcome == "OK"]
        assert await close(f"burst-{accepted[0]}") == "OK"  # a retry makes nothing new
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await actions.close(report.name, [ref])
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CLOSURE_RATE_LIMITED" in str(limited.value.trailing_metadata())
    finally:
        await actions.aclose()
        await client.close()
    other = await verified_client(union, LI)
    other_actions = Actions(union, other)
    try:
        _, theirs = await run_lookup(other)
        assert (await other_actions.close(theirs.name, [theirs.cards[0].card_ref])).items
    finally:
        await other_actions.aclose()
        await other.close()
