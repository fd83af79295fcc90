"""The privacy promise at its edges: refused input, expiry, bursts, strangers, reused request ids.

Each test runs on SQLite and PostgreSQL (the `database_url` fixture), through the public gRPC API,
and reads the union's own tables where the promise is about what is kept.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from google.protobuf.json_format import MessageToJson
from sqlalchemy import func, select

from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError
from server.bank.bank_server import RunningBank
from server.bank.store import StoredCard
from server.common.checks import resident_id_check_char
from server.population.generator import cards_of
from server.union.clock import FakeClock
from server.union.domain.audit import safe_resource
from server.union.domain.identity import IdentityPolicy
from server.union.sms import read_one_time_code
from server.union.storage.models import (
    AuditEventRow,
    BankCooldownRow,
    BankTaskRow,
    Base,
    CardActionRow,
    CardClosureRow,
    FoundCardRow,
    LookupRow,
    NotificationRow,
    QuotaSlotRow,
    ReportRow,
    VerificationRow,
)
from server.union.union_server import UnionServer
from tests.conftest import LI, LIU, SEED, ZHANG, UnionFactory, run_lookup, verified_client

SHANGHAI = ZoneInfo("Asia/Shanghai")
# What a careless or hostile client might type into a resource name: a full resident ID number
# followed by a person's name, and a Luhn-valid card number with a real BIN.
TYPED_ID = ZHANG.resident_id_number
TYPED_PAN = cards_of(SEED, ZHANG)[0].number


def _count(union: UnionServer, table: type) -> int:
    with union.store.engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(table)) or 0)


def _audit_rows(union: UnionServer) -> list[tuple[str, str, str]]:
    with union.store.engine.connect() as connection:
        return [
            (row.action, row.outcome, row.resource)
            for row in connection.execute(select(AuditEventRow).order_by(AuditEventRow.id))
        ]


def _all_text(union: UnionServer) -> str:
    """Every value in every table of the union's database, as one string."""
    with union.store.engine.connect() as connection:
        return "\n".join(
            repr(tuple(row))
            for table in Base.metadata.sorted_tables
            for row in connection.execute(select(table))
        )


async def _error(call: object) -> CardLookupError:
    with pytest.raises(CardLookupError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_refused_requests_keep_and_echo_nothing_the_client_typed(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
        typed_names = [
            f"reports/{TYPED_ID}张伟",  # malformed: refused as INVALID_ARGUMENT
            f"reports/{TYPED_PAN}",  # well-formed but nobody's: NOT_FOUND
            f"lookups/{TYPED_PAN}",
            f"closures/{TYPED_PAN}",
        ]
        refusals = [
            await _error(client.get_report(typed_names[0])),
            await _error(client.get_report(typed_names[1])),
            await _error(client.delete_report(typed_names[1])),
            await _error(client.get_lookup(typed_names[2])),
            await _error(client.get_closure(typed_names[3])),
            await _error(client.close_cards(typed_names[0], [TYPED_PAN])),
            await _error(client.close_cards(typed_names[1], [report.cards[0].card_ref])),
            await _error(client.flag_not_mine(typed_names[1], report.cards[0].card_ref)),
            await _error(client.flag_not_mine(report.name, TYPED_PAN)),
            await _error(
                client.create_lookup(request_id=f"{TYPED_ID}-张伟", consent_terms_version=TERMS_VERSION)
            ),
        ]
        assert {r.code for r in refusals} == {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        answers = "\n".join(f"{r} {r.field_violations} {r.reason}" for r in refusals)
        trail = MessageToJson(await client.my_audit_events())
    for typed in (TYPED_ID, TYPED_PAN, "张伟"):
        assert typed not in answers, "an error echoed what the client typed"
        assert typed not in trail
    # The refusals are in the trail, each with no resource or one the union made itself.
    rows = _audit_rows(union)
    refused = [row for row in rows if row[1].startswith("refused:")]
    assert len(refused) >= 8
    assert {resource for _, _, resource in refused} <= {"", report.name}
    stored = _all_text(union)
    assert TYPED_ID not in stored
    assert TYPED_PAN not in stored
    assert "张伟" not in stored


async def test_a_request_id_is_kept_only_as_a_keyed_hash(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        # A card number fits the request_id pattern; it is accepted, never stored or echoed.
        events, report = await run_lookup(client, request_id=TYPED_PAN)
        closure = await client.close_cards(report.name, [report.cards[0].card_ref], request_id=TYPED_ID)
        flag = await client.flag_not_mine(report.name, report.cards[1].card_ref, request_id=TYPED_ID)
        answers = "".join(MessageToJson(m) for m in [*events, report, closure, flag])
        # A retry with the same request_id still finds what it made.
        assert (
            await client.create_lookup(request_id=TYPED_PAN, consent_terms_version=TERMS_VERSION)
        ).name == events[-1].lookup.name
        assert (
            await client.close_cards(report.name, [report.cards[0].card_ref], request_id=TYPED_ID)
        ).name == (closure.name)
    assert TYPED_PAN not in answers
    assert TYPED_ID not in answers
    stored = _all_text(union)
    assert TYPED_PAN not in stored
    assert TYPED_ID not in stored


async def test_every_read_of_a_persons_data_is_audited(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
        lookup_name = events[-1].lookup.name
        await client.get_lookup(lookup_name)
        await client.list_reports()
        await client.get_report(report.name)
        closure = await client.close_cards(report.name, [report.cards[0].card_ref])
        await client.get_closure(closure.name)
        await client.list_closures()
    by_action = {action: resource for action, outcome, resource in _audit_rows(union) if outcome == "ok"}
    assert by_action["lookup.watch"] == lookup_name
    assert by_action["lookup.read"] == lookup_name
    assert by_action["report.list"] == ""
    assert by_action["report.read"] == report.name
    assert by_action["closure.read"] == closure.name
    assert "closure.list" in by_action


async def test_reading_an_audit_trail_is_itself_audited(union: UnionServer) -> None:
    """A trail is data about a person: the person's own read and an operator's read of it both
    leave an event, the operator's naming whose trail (by keyed hash, never an ID number)."""
    client = await verified_client(union, ZHANG)
    async with client:
        first = (await client.my_audit_events()).events
        assert "audit.read" not in {e.action for e in first}  # a read never shows itself
        again = (await client.my_audit_events()).events
        [own_read] = [e for e in again if e.action == "audit.read"]
        person = own_read.actor
    assert (own_read.outcome, own_read.resource) == ("ok", "")
    async with CardLookupClient(union.address, admin_token="test-admin-token") as operator:
        read = await operator.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest(actor=person))
        assert read.events
        await operator.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest())
        # An operator reading their own actions is still an operator's read.
        with union.store.engine.connect() as connection:
            mine = connection.scalar(
                select(AuditEventRow.actor).where(AuditEventRow.action == "admin.audit.read").limit(1)
            )
        assert mine is not None
        assert mine.startswith("admin:")
        await operator.admin("ListAuditEvents", admin_pb.ListAuditEventsRequest(actor=mine))
    admin_reads = [
        (outcome, resource)
        for action, outcome, resource in _audit_rows(union)
        if action == "admin.audit.read"
    ]
    assert admin_reads == [("ok", f"people/{person}"), ("ok", ""), ("ok", "")]
    assert ZHANG.resident_id_number not in _all_text(union)


async def test_the_bank_decision_names_the_card_action_and_no_resource_is_a_number(
    union: UnionServer,
) -> None:
    # Every resource has its id's exact shape, so a card or ID number never passes for one.
    assert safe_resource("reports/6222021234567890128") == "(invalid)"
    assert safe_resource(f"people/{ZHANG.resident_id_number}") == "(invalid)"
    assert safe_resource("reports/r" + "0" * 24) == "reports/r" + "0" * 24
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
        closure = await client.close_cards(report.name, [report.cards[0].card_ref])
        for _ in range(100):  # bounded by attempts: the bank's answer arrives on its own time
            if all(item.state != action_pb.CARD_CLOSURE_STATE_PENDING for item in closure.items):
                break
            await asyncio.sleep(0.1)
            closure = await client.get_closure(closure.name)
    for _ in range(100):
        decided = [(o, r) for action, o, r in _audit_rows(union) if action == "card.closed"]
        if decided:
            break
        await asyncio.sleep(0.1)
    [(outcome, resource)] = decided
    assert outcome.startswith(f"{report.cards[0].bank_code}:")
    assert re.fullmatch(r"cardActions/a[0-9a-f]{24}", resource)


async def test_watching_a_finished_lookup_says_report_ready_once(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        events, _ = await run_lookup(client)
        again = [event async for event in client.watch_lookup(events[-1].lookup.name, stream_timeout=30)]
    assert [event.report_ready for event in again] == [True]
    assert [event.report_ready for event in events].count(True) == 1


async def test_lookups_go_with_their_reports(make_union: UnionFactory) -> None:
    clock = FakeClock(datetime(2026, 11, 27, 15, 0, tzinfo=SHANGHAI).astimezone(UTC))
    union = await make_union(clock=clock, identity=IdentityPolicy(session_ttl=timedelta(days=30)))
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
        lookup_name = events[-1].lookup.name
        assert (await client.get_lookup(lookup_name)).report == report.name

        clock.set(datetime(2026, 12, 5, 0, 0, 0, tzinfo=SHANGHAI).astimezone(UTC))
        # Expired but not yet purged: neither the report nor the lookup's counts are served.
        assert (await _error(client.get_lookup(lookup_name))).code == grpc.StatusCode.NOT_FOUND
        watch = client.watch_lookup(lookup_name, stream_timeout=10)
        assert (await _error(watch.__anext__())).code == grpc.StatusCode.NOT_FOUND
        assert _count(union, LookupRow) == 1

        await union.retention.sweep(clock.now())
        for table in (ReportRow, LookupRow, BankTaskRow):
            assert _count(union, table) == 0, table
        assert (await _error(client.get_lookup(lookup_name))).code == grpc.StatusCode.NOT_FOUND


async def test_deleting_a_report_deletes_its_lookup(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
        await client.delete_report(report.name)
        assert (await _error(client.get_lookup(events[-1].lookup.name))).code == grpc.StatusCode.NOT_FOUND
    assert _count(union, LookupRow) == 0
    assert _count(union, BankTaskRow) == 0


async def test_deleting_a_report_does_not_reset_the_requery_cooldown(make_union: UnionFactory) -> None:
    clock = FakeClock(datetime(2026, 11, 27, 15, 0, tzinfo=SHANGHAI).astimezone(UTC))
    union = await make_union(clock=clock, identity=IdentityPolicy(session_ttl=timedelta(days=30)))
    client = await verified_client(union, ZHANG)
    async with client:
        events, report = await run_lookup(client)
        answered = [
            b for b in events[-1].lookup.bank_progress if b.outcome == lookup_pb.BANK_OUTCOME_ANSWERED
        ]
        await client.delete_report(report.name)
        # The lookup and its per-bank rows are gone; what the cooldown needs is kept apart.
        assert _count(union, LookupRow) == 0
        assert _count(union, BankCooldownRow) == len(answered) > 0
        refused = await _error(client.create_lookup(consent_terms_version=TERMS_VERSION))
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.reason == "REQUERY_COOLDOWN"

        clock.advance(union.config.lookups.requery_cooldown + timedelta(minutes=1))
        await union.retention.sweep(clock.now())
        assert _count(union, BankCooldownRow) == 0
        assert (await client.create_lookup(consent_terms_version=TERMS_VERSION)).name.startswith("lookups/")


async def test_every_kind_of_personal_data_is_purged_after_its_retention(make_union: UnionFactory) -> None:
    start = datetime(2026, 11, 27, 15, 0, tzinfo=SHANGHAI).astimezone(UTC)
    clock = FakeClock(start)
    union = await make_union(clock=clock, identity=IdentityPolicy(session_ttl=timedelta(days=60)))
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
        await client.close_cards(report.name, [report.cards[0].card_ref])
        await client.flag_not_mine(report.name, report.cards[1].card_ref)
    with union.store.engine.begin() as connection:  # a report-ready message that never went out
        connection.execute(
            NotificationRow.__table__.insert().values(
                lookup_id="lgone", report_id="rgone", sealed_contact="x", create_time=start
            )
        )
    retention = union.config.retention
    for table in (
        VerificationRow,
        QuotaSlotRow,
        CardActionRow,
        CardClosureRow,
        AuditEventRow,
        NotificationRow,
    ):
        assert _count(union, table) > 0, table
    assert union.config.sms_sink_path.read_text(encoding="utf-8").strip()

    # Just inside each retention nothing goes; just past it, everything of that kind does.
    clock.set(start + retention.verifications - timedelta(minutes=1))
    await union.retention.sweep(clock.now())
    assert _count(union, VerificationRow) > 0
    clock.set(start + retention.verifications + timedelta(minutes=1))
    purged = await union.retention.sweep(clock.now())
    assert _count(union, VerificationRow) == 0
    assert _count(union, QuotaSlotRow) == 0
    assert _count(union, NotificationRow) == 0
    assert purged["sms_outbox"] >= 1
    # The SMS outbox file is trimmed by its own time stamps, which are the wall clock's.
    assert _count(union, CardActionRow) == 2

    clock.set(start + retention.card_actions + timedelta(minutes=1))
    await union.retention.sweep(clock.now())
    assert _count(union, CardActionRow) == 0
    assert _count(union, CardClosureRow) == 0

    clock.set(start + retention.audit + timedelta(minutes=1))
    await union.retention.sweep(clock.now())
    assert _count(union, AuditEventRow) == 0
    async with CardLookupClient(union.address, admin_token="test-admin-token") as operator:
        stats = await operator.admin("GetServiceStats", admin_pb.GetServiceStatsRequest())
    assert stats.people_verified == 1  # the count outlives the purged pseudonyms


async def test_the_start_verification_limit_is_exact_under_a_burst(union: UnionServer) -> None:
    limit = union.config.identity.max_starts_per_window
    async with CardLookupClient(union.address) as client:

        async def start() -> grpc.StatusCode:
            try:
                await client.start_verification(ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number)
            except CardLookupError as error:
                return error.code
            return grpc.StatusCode.OK

        outcomes = await asyncio.gather(*(start() for _ in range(60)))
    assert outcomes.count(grpc.StatusCode.OK) == limit
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 60 - limit
    assert _count(union, VerificationRow) == limit


async def test_a_burst_of_creates_makes_exactly_one_lookup(union: UnionServer) -> None:
    client = await verified_client(union, LI)
    async with client:

        async def create() -> grpc.StatusCode:
            try:
                await client.create_lookup(request_id=uuid.uuid4().hex, consent_terms_version=TERMS_VERSION)
            except CardLookupError as error:
                return error.code
            return grpc.StatusCode.OK

        outcomes = await asyncio.gather(*(create() for _ in range(50)))
    assert outcomes.count(grpc.StatusCode.OK) == 1
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 49
    assert _count(union, LookupRow) == 1


async def _wrong_codes(client: CardLookupClient, verification_id: str, times: int) -> list[tuple[Any, ...]]:
    """What completing a verification with wrong codes `times` times answers, each time."""
    answers = []
    for _ in range(times):
        refused = await _error(client.complete_verification(verification_id, "000000"))
        answers.append((refused.code, refused.reason, refused.metadata.get("attempts_left")))
    return answers


async def test_a_stranger_cannot_lock_a_person_out(union: UnionServer) -> None:
    """Knowing only ZHANG's ID number, a stranger tries names and phones many times over."""
    tries = union.config.identity.max_code_attempts + 1
    async with CardLookupClient(union.address) as real:
        # How a real verification answers wrong codes (LI's; "000000" is wrong unless by chance).
        started = await real.start_verification(LI.name, LI.resident_id_number, LI.mobile_number)
        assert read_one_time_code(union.config.sms_sink_path, LI.mobile_number) != "000000"
        genuine = await _wrong_codes(real, started.verification_id, tries)
    async with CardLookupClient(union.address) as stranger:
        answers = []
        for attempt in range(3 * union.config.identity.max_mismatches_per_window):
            try:
                started = await stranger.start_verification(
                    "李四", ZHANG.resident_id_number, f"1390000{attempt:04d}"
                )
            except CardLookupError as error:
                answers.append(error.reason)
                continue
            answers.append("started")
            # What looks like a start past the limit sent no code, and answers wrong codes exactly
            # as a real verification does: completing it tells the stranger nothing either.
            assert await _wrong_codes(stranger, started.verification_id, tries) == genuine
        limit = union.config.identity.max_mismatches_per_window
        assert answers[:limit] == ["IDENTITY_MISMATCH"] * limit
        assert set(answers[limit:]) == {"started"}  # the limit cannot be probed
    # ... but ZHANG's trail says what each attempt was: none of them started a verification.
    starts = [outcome for action, outcome, _ in _audit_rows(union) if action == "verification.start"]
    # (LI's real start first.)
    assert starts == ["ok"] + ["refused:IDENTITY_MISMATCH"] * limit + ["refused:IDENTITY_MISMATCH_LIMIT"] * (
        2 * limit
    )
    assert read_one_time_code(union.config.sms_sink_path, ZHANG.mobile_number) is None
    # ZHANG verifies and looks up as if nothing had happened.
    client = await verified_client(union, ZHANG)
    async with client:
        await client.create_lookup(consent_terms_version=TERMS_VERSION)


async def test_past_the_limit_an_unregistered_id_number_gets_the_same_decoy(union: UnionServer) -> None:
    first17 = "11010519900101999"
    unregistered = first17 + resident_id_check_char(first17)
    assert union.keys.person_hash(unregistered) != union.keys.person_hash(ZHANG.resident_id_number)
    async with CardLookupClient(union.address) as stranger:
        limit = union.config.identity.max_mismatches_per_window
        for _ in range(limit):
            refused = await _error(stranger.start_verification("李四", unregistered, "13900000000"))
            assert refused.reason == "IDENTITY_MISMATCH"
        started = await stranger.start_verification("李四", unregistered, "13900000000")
        refused = await _error(stranger.complete_verification(started.verification_id, "000000"))
        assert (refused.code, refused.reason) == (grpc.StatusCode.UNAUTHENTICATED, "WRONG_CODE")


async def test_wrong_codes_lock_the_verification_not_the_person(union: UnionServer) -> None:
    async with CardLookupClient(union.address) as client:
        started = await client.start_verification(LI.name, LI.resident_id_number, LI.mobile_number)
        right = read_one_time_code(union.config.sms_sink_path, LI.mobile_number)
        assert right is not None
        wrong = f"{(int(right) + 1) % 1_000_000:06d}"
        for _ in range(union.config.identity.max_code_attempts):
            await _error(client.complete_verification(started.verification_id, wrong))
        assert (await _error(client.complete_verification(started.verification_id, right))).code == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    # A new verification for the same person works at once.
    client = await verified_client(union, LI)
    await client.close()


async def test_a_reused_request_id_with_another_request_does_nothing(
    union: UnionServer, banks: dict[str, RunningBank]
) -> None:
    client = await verified_client(union, LIU)
    async with client:
        _, report = await run_lookup(client, request_id="first", bank_codes=["ICBC", "CMB"])
        reused = await _error(
            client.create_lookup(request_id="first", bank_codes=["ICBC"], consent_terms_version=TERMS_VERSION)
        )
        assert reused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in reused.field_violations] == ["request_id"]

        icbc = [card for card in report.cards if card.bank_code == "ICBC"]
        closure = await client.close_cards(report.name, [icbc[0].card_ref], request_id="close-1")
        again = await _error(client.close_cards(report.name, [icbc[1].card_ref], request_id="close-1"))
        assert again.code == grpc.StatusCode.INVALID_ARGUMENT
        assert len((await client.get_closure(closure.name)).items) == 1

        bank_store = banks["ICBC"].servicer.store

        def at_bank(card: lookup_pb.ReportCard) -> StoredCard:
            stored = bank_store.find_card(LIU.resident_id_number, LIU.name, _bank_ref(union, card))
            assert stored is not None
            return stored

        # Two cards a flag would freeze: the population has frozen cards too, and the report's
        # order follows card references that are new with every lookup.
        mine, other_card = [card for card in icbc[2:] if at_bank(card).status == "active"][:2]
        other_before = at_bank(other_card)
        flag = await client.flag_not_mine(report.name, mine.card_ref, request_id="flag-1")
        other = await _error(client.flag_not_mine(report.name, other_card.card_ref, request_id="flag-1"))
        assert other.code == grpc.StatusCode.INVALID_ARGUMENT
        # The same request again is the same flag (a retry), and the other card was never touched.
        retried = await client.flag_not_mine(report.name, mine.card_ref, request_id="flag-1")
        assert (retried.card_ref, retried.create_time) == (flag.card_ref, flag.create_time)
    flagged = {row.card_ref for row in _action_rows(union) if row.kind == "flag"}
    assert flagged == {mine.card_ref}
    assert at_bank(other_card).status == other_before.status == "active"


def _action_rows(union: UnionServer) -> list[CardActionRow]:
    with union.store.engine.connect() as connection:
        return list(connection.execute(select(CardActionRow)))  # type: ignore[arg-type]


def _bank_ref(union: UnionServer, card: lookup_pb.ReportCard) -> str:
    """The bank's own reference of a card in a report (the union keeps it; the person never sees it)."""
    with union.store.engine.connect() as connection:
        return str(
            connection.scalar(
                select(FoundCardRow.bank_card_ref).where(FoundCardRow.card_ref == card.card_ref)
            )
        )
