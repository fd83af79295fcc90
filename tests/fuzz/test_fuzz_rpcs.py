"""Property-based fuzzing of every RPC of the union and the banks (design invariant 5: bad input never hurts).

Properties, for thousands of arbitrary and near-valid requests:
- only the status codes documented on the RPC in protos/ come back (never UNKNOWN or INTERNAL);
- nothing hangs: every call has a deadline, and only WatchLookup may run into it;
- requests over 64 KiB are refused by the transport with RESOURCE_EXHAUSTED, and bytes that are no
  valid request message get INVALID_ARGUMENT (server/common/request_guard.py) on every RPC;
- ownership: another person's lookup, report, closure or card is NOT_FOUND (a card_ref of another
  report INVALID_ARGUMENT), a missing/forged credential UNAUTHENTICATED; audit events listed for a
  person are that person's, and those listed for an actor or time range match the filter;
- card actions: a valid request on the caller's own report succeeds, a retry returns the first answer;
- afterwards every server still answers health checks with SERVING and a normal flow still works.

Successful closures and "not mine" flags really change the banks' cards (a closed card vanishes from
QueryCards, a flagged one is frozen), so no property relies on a card staying as the setup found it.

The servers are started once for the module (tests/fuzz/conftest.py) and driven with synchronous
gRPC calls from plain `@given` tests. The default run sends at least 10,000 requests; set
CARDLOOKUP_FUZZ_EXAMPLES to a multiplier ("10") or a total ("100000") for a longer nightly run.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from math import ceil
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as bank_pb
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cardlookup.v1 import identity_service_pb2 as identity_pb
from google.protobuf import field_mask_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.client import TERMS_VERSION
from server.common.grpc_runtime import MAX_RECEIVE_MESSAGE_BYTES
from server.population.catalogue import PILOT_REGIONS
from server.population.generator import DEMO_PEOPLE, Person, people
from server.union.sms import read_one_time_code
from tests.conftest import LI, LIU, SEED, SIZE, WANG, ZHANG
from tests.fuzz import strategies as fs
from tests.fuzz.conftest import ADMIN_TOKEN, SUMMARY, FuzzStack, fuzz_scale, target_total

CHEN = DEMO_PEOPLE[4].person  # Zhejiang (open), no cards, no lookup until the fuzz makes one
C = grpc.StatusCode
UNARY_TIMEOUT = 10.0
STREAM_TIMEOUT = 20.0
# Credentials stay well below gRPC's 8 KiB metadata soft limit (beyond it the transport refuses at random);
# test_fuzz_oversized sends metadata over the 16 KiB hard limit on purpose.
MAX_TOKEN = 4096
METADATA_HARD_LIMIT = 16 * 1024

# Examples per property for the default run; requests per example in the comments. The shares add up
# to ~10,450 requests so that the 10,000 total holds even if hypothesis stops a few examples early.
SHARES = {
    "identity": 750,  # x1
    "lookup": 1050,  # x3 (a person's valid session, another person's, a bad credential)
    "card_actions": 650,  # x3 (as for lookup, plus a retry of some successful actions)
    "admin": 1050,  # x3 (the admin token, a bad one, none)
    "bank": 450,  # x2-4 (the same request to two banks, a query also on a QuerySession and a
    # QueryBatchSession stream, plus a retry or a QueryCards after some card actions)
    "oversized": 25,  # x1 (each refusal costs the transport ~0.2 s)
    "raw_bytes": 450,  # x1
}
FUZZ_TESTS = {f"test_fuzz_{name}" for name in SHARES} | {"test_duplicate_request_ids_race"}


def examples(share: str) -> int:
    return max(10, ceil(SHARES[share] * fuzz_scale()))


def fuzz_settings(share: str) -> settings:
    return settings(
        max_examples=examples(share),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


@dataclass(frozen=True)
class Rpc:
    path: str
    request: type[Message]
    response: type[Message]
    documented: frozenset[C]
    stream: bool = False
    bidi: bool = False  # a stream of requests too (sent here as a stream of one)


def _rpc(path: str, req: Any, resp: Any, codes: Sequence[C], stream: bool = False, bidi: bool = False) -> Rpc:
    return Rpc(path, req, resp, frozenset([C.OK, *codes]), stream, bidi)


IDENTITY = "/cardlookup.v1.IdentityService/"
LOOKUP = "/cardlookup.v1.CardLookupService/"
ACTION = "/cardlookup.v1.CardActionService/"
ADMIN = "/cardlookup.v1.AdminService/"
BANK = "/bankquery.v1.BankQueryService/"
# The "Status codes:" lists of the RPC comments in protos/.
RPCS = {
    "StartVerification": _rpc(
        IDENTITY + "StartVerification",
        identity_pb.StartVerificationRequest,
        identity_pb.StartVerificationResponse,
        [C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED],
    ),
    "CompleteVerification": _rpc(
        IDENTITY + "CompleteVerification",
        identity_pb.CompleteVerificationRequest,
        identity_pb.CompleteVerificationResponse,
        [C.INVALID_ARGUMENT, C.NOT_FOUND, C.UNAUTHENTICATED, C.RESOURCE_EXHAUSTED],
    ),
    "SignOut": _rpc(
        IDENTITY + "SignOut", identity_pb.SignOutRequest, identity_pb.SignOutResponse, [C.UNAUTHENTICATED]
    ),
    "CreateLookup": _rpc(
        LOOKUP + "CreateLookup",
        lookup_pb.CreateLookupRequest,
        lookup_pb.CreateLookupResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED],
    ),
    "GetLookup": _rpc(
        LOOKUP + "GetLookup",
        lookup_pb.GetLookupRequest,
        lookup_pb.GetLookupResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND],
    ),
    "WatchLookup": _rpc(
        LOOKUP + "WatchLookup",
        lookup_pb.WatchLookupRequest,
        lookup_pb.WatchLookupResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND, C.CANCELLED, C.DEADLINE_EXCEEDED],
        stream=True,
    ),
    "GetReport": _rpc(
        LOOKUP + "GetReport",
        lookup_pb.GetReportRequest,
        lookup_pb.GetReportResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND],
    ),
    "ListLookups": _rpc(
        LOOKUP + "ListLookups",
        lookup_pb.ListLookupsRequest,
        lookup_pb.ListLookupsResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED],
    ),
    "ListReports": _rpc(
        LOOKUP + "ListReports",
        lookup_pb.ListReportsRequest,
        lookup_pb.ListReportsResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED],
    ),
    "DeleteReport": _rpc(
        LOOKUP + "DeleteReport",
        lookup_pb.DeleteReportRequest,
        lookup_pb.DeleteReportResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND],
    ),
    "ListBanks": _rpc(
        ADMIN + "ListBanks",
        admin_pb.ListBanksRequest,
        admin_pb.ListBanksResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED],
    ),
    "CreateBank": _rpc(
        ADMIN + "CreateBank",
        admin_pb.CreateBankRequest,
        admin_pb.CreateBankResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.ALREADY_EXISTS],
    ),
    "UpdateBank": _rpc(
        ADMIN + "UpdateBank",
        admin_pb.UpdateBankRequest,
        admin_pb.UpdateBankResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND],
    ),
    "ListRegions": _rpc(
        ADMIN + "ListRegions",
        admin_pb.ListRegionsRequest,
        admin_pb.ListRegionsResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED],
    ),
    "UpdateRegion": _rpc(
        ADMIN + "UpdateRegion",
        admin_pb.UpdateRegionRequest,
        admin_pb.UpdateRegionResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND],
    ),
    "GetServiceStats": _rpc(
        ADMIN + "GetServiceStats",
        admin_pb.GetServiceStatsRequest,
        admin_pb.GetServiceStatsResponse,
        [C.UNAUTHENTICATED],
    ),
    "ListAuditEvents": _rpc(
        ADMIN + "ListAuditEvents",
        admin_pb.ListAuditEventsRequest,
        admin_pb.ListAuditEventsResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED],
    ),
    "CreateCardClosure": _rpc(
        ACTION + "CreateCardClosure",
        action_pb.CreateCardClosureRequest,
        action_pb.CreateCardClosureResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND, C.RESOURCE_EXHAUSTED],
    ),
    "GetCardClosure": _rpc(
        ACTION + "GetCardClosure",
        action_pb.GetCardClosureRequest,
        action_pb.GetCardClosureResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND],
    ),
    "ListCardClosures": _rpc(
        ACTION + "ListCardClosures",
        action_pb.ListCardClosuresRequest,
        action_pb.ListCardClosuresResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED],
    ),
    "FlagCardNotMine": _rpc(
        ACTION + "FlagCardNotMine",
        action_pb.FlagCardNotMineRequest,
        action_pb.FlagCardNotMineResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.NOT_FOUND],
    ),
    "ListMyAuditEvents": _rpc(
        ACTION + "ListMyAuditEvents",
        action_pb.ListMyAuditEventsRequest,
        action_pb.ListMyAuditEventsResponse,
        [C.INVALID_ARGUMENT, C.UNAUTHENTICATED],
    ),
    # DEADLINE_EXCEEDED is documented too, but the fault-free banks here answer in milliseconds:
    # running into the 10 s deadline would be a hang, so it is not accepted.
    "QueryCards": _rpc(
        BANK + "QueryCards",
        bank_pb.QueryCardsRequest,
        bank_pb.QueryCardsResponse,
        [C.INVALID_ARGUMENT, C.UNAVAILABLE],
        stream=True,
    ),
    # A query's own failure is answered in the stream (QueryError); the stream itself ends OK.
    # UNIMPLEMENTED is documented for banks without sessions, which these are not.
    "QuerySession": _rpc(
        BANK + "QuerySession",
        bank_pb.QuerySessionRequest,
        bank_pb.QuerySessionResponse,
        [C.UNAVAILABLE],
        bidi=True,
    ),
    # As QuerySession; a message with no query (or more than 256) ends the stream INVALID_ARGUMENT.
    "QueryBatchSession": _rpc(
        BANK + "QueryBatchSession",
        bank_pb.QueryBatchSessionRequest,
        bank_pb.QueryBatchSessionResponse,
        [C.INVALID_ARGUMENT, C.UNAVAILABLE],
        bidi=True,
    ),
    "CloseCard": _rpc(
        BANK + "CloseCard",
        bank_pb.CloseCardRequest,
        bank_pb.CloseCardResponse,
        [C.INVALID_ARGUMENT, C.NOT_FOUND, C.UNAVAILABLE],
    ),
    "ReportCardNotMine": _rpc(
        BANK + "ReportCardNotMine",
        bank_pb.ReportCardNotMineRequest,
        bank_pb.ReportCardNotMineResponse,
        [C.INVALID_ARGUMENT, C.NOT_FOUND, C.UNAVAILABLE],
    ),
}
BANK_RPCS = frozenset(name for name, rpc in RPCS.items() if rpc.path.startswith(BANK))


@dataclass
class Outcome:
    code: C
    details: str
    responses: list[Any]


class Caller:
    """Sends one request (a message or raw bytes) and checks the universal properties on the way back."""

    def __init__(self, stack: FuzzStack, counter: str) -> None:
        self.stack = stack
        self.counter = counter
        self.union = grpc.insecure_channel(stack.address)
        self.bank_channels = {code: grpc.insecure_channel(bank.address) for code, bank in stack.banks.items()}
        stack.counts.setdefault(counter, 0)

    def close(self) -> None:
        self.union.close()
        for channel in self.bank_channels.values():
            channel.close()

    def __enter__(self) -> Caller:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(
        self,
        name: str,
        request: Message | bytes,
        metadata: Sequence[tuple[str, str]] = (),
        bank: str | None = None,
        expect: set[C] | None = None,
    ) -> Outcome:
        rpc = RPCS[name]
        data = request if isinstance(request, bytes) else request.SerializeToString()
        channel = self.bank_channels[bank] if bank else self.union
        mark = self.stack.errors.mark()
        if rpc.bidi:
            bidi_call = channel.stream_stream(rpc.path, None, rpc.response.FromString)
            responses = []
            try:
                for item in bidi_call(iter([data]), timeout=STREAM_TIMEOUT, metadata=tuple(metadata)):
                    responses.append(item)
                outcome = Outcome(C.OK, "", responses)
            except grpc.RpcError as error:
                outcome = Outcome(error.code(), error.details() or "", responses)
        elif rpc.stream:
            stream_call = channel.unary_stream(rpc.path, None, rpc.response.FromString)
            responses: list[Any] = []
            try:
                for item in stream_call(data, timeout=STREAM_TIMEOUT, metadata=tuple(metadata)):
                    responses.append(item)
                outcome = Outcome(C.OK, "", responses)
            except grpc.RpcError as error:
                outcome = Outcome(error.code(), error.details() or "", responses)
        else:
            unary_call = channel.unary_unary(rpc.path, None, rpc.response.FromString)
            try:
                response = unary_call(data, timeout=UNARY_TIMEOUT, metadata=tuple(metadata))
                outcome = Outcome(C.OK, "", [response])
            except grpc.RpcError as error:
                outcome = Outcome(error.code(), error.details() or "", [])
        self.stack.counts[self.counter] += 1

        def explain(problem: str) -> str:
            shown = request if isinstance(request, bytes) else f"{type(request).__name__}({request!s:.2000})"
            logs = self.stack.errors.render(self.stack.errors.since(mark)) or "(no ERROR log lines)"
            meta = [(k, v[:200]) for k, v in metadata]
            return (
                f"{problem}\n  rpc: {rpc.path} (bank {bank})\n"
                f"  request ({len(data)} bytes): {shown!r:.3000}\n"
                f"  metadata: {meta}\n  status: {outcome.code.name}: {outcome.details[:500]}\n"
                f"  server log:\n{logs}"
            )

        metadata_bytes = sum(len(k) + len(v) for k, v in metadata)
        if len(data) > MAX_RECEIVE_MESSAGE_BYTES or metadata_bytes > METADATA_HARD_LIMIT:
            assert outcome.code == C.RESOURCE_EXHAUSTED, explain("an oversized request was not refused")
            return outcome
        if isinstance(request, bytes) and not _parses(name, data):
            # On every RPC, before authentication (server/common/request_guard.py). GetServiceStats does
            # not list INVALID_ARGUMENT, but a request that is no message at all is the caller's mistake.
            assert outcome.code == C.INVALID_ARGUMENT, explain(
                "unparseable bytes did not get INVALID_ARGUMENT"
            )
            leaked = ("DecodeError", "Unexpected <class", "Traceback")
            assert not any(text in outcome.details for text in leaked), explain("parser internals leaked")
            return outcome
        assert outcome.code not in (C.UNKNOWN, C.INTERNAL), explain("UNKNOWN/INTERNAL for caller input")
        assert outcome.code in rpc.documented, explain("status code not documented for this RPC")
        if expect is not None:
            assert outcome.code in expect, explain(f"expected one of {sorted(c.name for c in expect)}")
        return outcome


def _header_safe(value: str) -> bool:
    """What an HTTP/2 header value may hold (anything else the client library refuses to send)."""
    return all(0x20 <= ord(c) <= 0x7E for c in value)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _credential(world: World, name: str) -> list[tuple[str, str]]:
    """The credential the RPC-agnostic tests send: the admin's, or a person's session; SignOut gets
    one that is no live session (a SignOut that parsed would end the session the suite relies on)."""
    if RPCS[name].path.startswith(ADMIN):
        return bearer(ADMIN_TOKEN)
    if name == "SignOut":
        return bearer("v1.e30.AAAA")
    return bearer(world.sessions[ZHANG.name])


# -- the shared world: sessions, real lookups and reports ------------------------------


@dataclass
class World:
    sessions: dict[str, str]  # person name -> session token
    owner_of: dict[str, str]  # resource name -> owning person name
    request_ids: list[str]
    lookup_names: list[str]
    report_names: list[str]
    verifications: list[tuple[str, str]]  # (verification_id, right code)
    registered: list[Person]
    started: float
    # Two people of their own for CardActionService, whose reports the lookup fuzz never deletes.
    action_people: list[Person] = field(default_factory=list)
    report_cards: dict[str, list[str]] = field(default_factory=dict)  # their report -> its card_refs
    bank_cards: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # person -> (bank, ref)
    actors: dict[str, str] = field(default_factory=dict)  # person name -> audit actor hash
    closure_requests: dict[tuple[str, str], str] = field(default_factory=dict)  # (person, request_id)
    # What each (person, request_id) asked: a closure's (report, sorted card_refs), a flag's
    # (report, card_ref). The same request_id with another ask is refused (AIP-155).
    closure_asks: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # Every (report, card_ref) a (person, request_id) was answered OK for: a flag's request_id is taken
    # only when it made the flag (a card flagged before answers with that flag and takes no id).
    flag_asks: dict[tuple[str, str], set[tuple[str, str]]] = field(default_factory=dict)
    # Real page tokens: token -> (family, scope). Families "audit", "closures", "banks"; scopes "*" (every
    # actor), "person:<name>" (ListMyAuditEvents, ListCardClosures), "actor:<hash>" (ListAuditEvents).
    page_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)


def _lookup_to_report(caller: Caller, token: str, request_id: str) -> tuple[str, str]:
    created = caller.call(
        "CreateLookup",
        lookup_pb.CreateLookupRequest(request_id=request_id, consent_terms_version=TERMS_VERSION),
        bearer(token),
    )
    assert created.code == C.OK, created.details
    lookup = created.responses[0].lookup.name
    watched = caller.call("WatchLookup", lookup_pb.WatchLookupRequest(name=lookup), bearer(token))
    assert watched.code == C.OK, watched.details
    assert watched.responses[-1].report_ready
    return lookup, watched.responses[-1].lookup.report


def _session_while_open(stack: FuzzStack, caller: Caller, person: Person) -> str:
    def set_open(is_open: bool) -> None:
        request = admin_pb.UpdateRegionRequest(
            code=person.region_code, open=is_open, update_mask=field_mask_pb2.FieldMask(paths=["open"])
        )
        assert caller.call("UpdateRegion", request, bearer(ADMIN_TOKEN)).code == C.OK

    set_open(True)
    try:
        return stack.verify(caller.union, person)
    finally:
        set_open(False)


@pytest.fixture(scope="module")
def world(fuzz_stack: FuzzStack) -> World:
    started = time.monotonic()
    with Caller(fuzz_stack, "setup") as caller:
        sessions = {p.name: fuzz_stack.verify(caller.union, p) for p in (ZHANG, LI, CHEN)}
        # WANG's region is closed, so StartVerification refuses them; the fuzz wants a session of a
        # closed region (CreateLookup: REGION_NOT_OPEN), so it is made while the region is open.
        sessions[WANG.name] = _session_while_open(fuzz_stack, caller, WANG)
        owner_of: dict[str, str] = {}
        request_ids = []
        for person in (ZHANG, LI):
            request_id = f"fuzz-{person.index}-{uuid.uuid4().hex[:8]}"
            lookup, report = _lookup_to_report(caller, sessions[person.name], request_id)
            owner_of[lookup] = owner_of[report] = person.name
            request_ids.append(request_id)
        # Real pending verifications (with their right codes) for CompleteVerification.
        # People of open regions: a closed region is refused before any code is sent.
        open_regions = {region.code for region in PILOT_REGIONS}
        registered = [
            p for p in people(SEED, SIZE) if p.index >= len(DEMO_PEOPLE) and p.region_code in open_regions
        ][:60]
        verifications = []
        for person in registered[:20]:
            started_v = caller.call(
                "StartVerification",
                identity_pb.StartVerificationRequest(
                    name=person.name,
                    resident_id_number=person.resident_id_number,
                    mobile_number=person.mobile_number,
                ),
            )
            code = read_one_time_code(fuzz_stack.union.config.sms_sink_path, person.mobile_number)
            assert started_v.code == C.OK
            assert code is not None
            verifications.append((started_v.responses[0].verification_id, code))
        world = World(
            sessions=sessions,
            owner_of=owner_of,
            request_ids=request_ids,
            lookup_names=[n for n in owner_of if n.startswith("lookups/")],
            report_names=[n for n in owner_of if n.startswith("reports/")],
            verifications=verifications,
            registered=registered[20:],
            started=started,
        )
        _card_action_world(caller, world)
    return world


def _next_token(outcome: Outcome) -> str:
    assert outcome.code == C.OK, outcome.details
    token: str = outcome.responses[0].next_page_token
    assert token
    return token


def _card_holders(stack: FuzzStack, candidates: list[Person], wanted: int) -> list[Person]:
    """People of pilot regions holding at least three cards (asked of the bank stores directly)."""
    pilot = {region.code for region in PILOT_REGIONS}
    found = []
    for person in candidates:
        if person.region_code not in pilot:
            continue
        held = sum(
            len(bank.store.find_cards(person.resident_id_number, person.name))
            for bank in stack.banks.values()
        )
        if held >= 3:
            found.append(person)
            if len(found) == wanted:
                return found
    raise AssertionError(f"fewer than {wanted} card holders among {len(candidates)} people")


def _card_action_world(caller: Caller, world: World) -> None:
    """Two card holders' reports and card_refs, bank card refs, actor hashes, closures and page tokens."""
    admin = bearer(ADMIN_TOKEN)
    unused = [p for p in people(SEED, SIZE) if p.index >= len(DEMO_PEOPLE) + 60]
    world.action_people = _card_holders(caller.stack, unused, 2)
    for person in world.action_people:
        token = world.sessions[person.name] = caller.stack.verify(caller.union, person)
        lookup, report = _lookup_to_report(caller, token, "fuzz-actions-" + uuid.uuid4().hex[:8])
        world.owner_of[lookup] = world.owner_of[report] = person.name
        got = caller.call("GetReport", lookup_pb.GetReportRequest(name=report), bearer(token), expect={C.OK})
        world.report_cards[report] = [card.card_ref for card in got.responses[0].report.cards]
        assert len(world.report_cards[report]) >= 3, got.responses[0].report
    for person in (ZHANG, LI, LIU):  # card refs straight from the banks, for CloseCard / ReportCardNotMine
        world.bank_cards[person.name] = []
        for bank in fs.BANK_CODES:
            answer = caller.call(
                "QueryCards",
                bank_pb.QueryCardsRequest(
                    query_id="setup", resident_id_number=person.resident_id_number, name=person.name
                ),
                bank=bank,
                expect={C.OK},
            )
            world.bank_cards[person.name] += [(bank, r.card.card_ref) for r in answer.responses[:-1]]
    for name, token in world.sessions.items():
        events = (
            caller.call(
                "ListMyAuditEvents", action_pb.ListMyAuditEventsRequest(), bearer(token), expect={C.OK}
            )
            .responses[0]
            .events
        )
        assert events
        assert len({e.actor for e in events}) == 1, events
        world.actors[name] = events[0].actor
    # The first holder closes two cards (one closure each), so that ListCardClosures has a second page.
    holder = world.action_people[0]
    session = bearer(world.sessions[holder.name])
    report = next(r for r in world.report_cards if world.owner_of[r] == holder.name)
    for ref in world.report_cards[report][:2]:
        request_id = "setup-" + uuid.uuid4().hex
        created = caller.call(
            "CreateCardClosure",
            action_pb.CreateCardClosureRequest(request_id=request_id, report=report, card_refs=[ref]),
            session,
            expect={C.OK},
        )
        closure = created.responses[0].closure.name
        world.owner_of[closure] = holder.name
        world.closure_requests[(holder.name, request_id)] = closure
    tokens = {
        ("closures", f"person:{holder.name}"): caller.call(
            "ListCardClosures", action_pb.ListCardClosuresRequest(page_size=1), session
        ),
        ("audit", "*"): caller.call("ListAuditEvents", admin_pb.ListAuditEventsRequest(page_size=1), admin),
        ("audit", f"actor:{world.actors[LI.name]}"): caller.call(
            "ListAuditEvents",
            admin_pb.ListAuditEventsRequest(actor=world.actors[LI.name], page_size=1),
            admin,
        ),
        ("banks", "*"): caller.call("ListBanks", admin_pb.ListBanksRequest(page_size=1), admin),
    }
    for person in (ZHANG, *world.action_people):
        tokens[("audit", f"person:{person.name}")] = caller.call(
            "ListMyAuditEvents",
            action_pb.ListMyAuditEventsRequest(page_size=1),
            bearer(world.sessions[person.name]),
        )
    world.page_tokens = {_next_token(outcome): kind for kind, outcome in tokens.items()}


def test_duplicate_request_ids_race(fuzz_stack: FuzzStack, world: World) -> None:
    """Concurrent retries with one request_id: one lookup, documented codes only, nothing hangs."""
    with Caller(fuzz_stack, "test_duplicate_request_ids_race") as caller:
        token = world.sessions[CHEN.name]
        request = lookup_pb.CreateLookupRequest(
            request_id="race-" + uuid.uuid4().hex, consent_terms_version=TERMS_VERSION
        )
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(
                pool.map(lambda _: caller.call("CreateLookup", request, bearer(token)), range(16))
            )
        created = {o.responses[0].lookup.name for o in outcomes if o.code == C.OK}
        assert len(created) <= 1, created
        assert {o.code for o in outcomes} <= {C.OK, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION}
        if created:
            world.owner_of[created.pop()] = CHEN.name


# -- IdentityService ---------------------------------------------------------------------


def test_fuzz_identity(fuzz_stack: FuzzStack, world: World) -> None:
    registered = st.sampled_from([*world.registered, ZHANG, LI, WANG, CHEN])
    real_ids = [v for v, _ in world.verifications]
    start_requests = st.one_of(
        st.builds(
            identity_pb.StartVerificationRequest,
            name=fs.names,
            resident_id_number=fs.id_numbers,
            mobile_number=fs.mobile_numbers,
        ),
        # One field off from a registered person (a mismatch, or a near-valid malformed field).
        st.builds(
            lambda p, which, value: identity_pb.StartVerificationRequest(
                name=value if which == 0 else p.name,
                resident_id_number=value if which == 1 else p.resident_id_number,
                mobile_number=value if which == 2 else p.mobile_number,
            ),
            registered,
            st.integers(0, 2),
            fs.fuzzed(st.just("张伟"), fs.resident_ids(), fs.mobiles),
        ),
        # Exactly a registered person: OK until the per-person rate limit says RESOURCE_EXHAUSTED.
        registered.map(
            lambda p: identity_pb.StartVerificationRequest(
                name=p.name, resident_id_number=p.resident_id_number, mobile_number=p.mobile_number
            )
        ),
    )
    verification_ids = fs.fuzzed(
        st.sampled_from(real_ids),
        st.builds(lambda h: "v" + h, fs.hex_ids),
        st.builds(lambda h: "x" + h, fs.hex_ids),
        st.sampled_from(["v", "v" + "0" * 40, "V" + real_ids[0][1:]]),
    )
    complete_requests = st.builds(
        identity_pb.CompleteVerificationRequest,
        verification_id=verification_ids,
        code=fs.fuzzed(fs.otp_codes, st.sampled_from([c for _, c in world.verifications])),
    )
    right_codes = st.sampled_from(world.verifications).map(
        lambda vc: identity_pb.CompleteVerificationRequest(verification_id=vc[0], code=vc[1])
    )

    with Caller(fuzz_stack, "test_fuzz_identity") as caller:

        @fuzz_settings("identity")
        @given(
            request=st.one_of(
                start_requests, complete_requests, right_codes, st.just(identity_pb.SignOutRequest())
            ),
            metadata=st.one_of(st.just([]), st.builds(bearer, fs.forged_tokens)),
        )
        def check(request: Message, metadata: list[tuple[str, str]]) -> None:
            name = type(request).__name__.removesuffix("Request")
            caller.call(name, request, metadata)

        check()


# -- CardLookupService ---------------------------------------------------------------------


def _bad_credentials(world: World) -> st.SearchStrategy[list[tuple[str, str]]]:
    zhang = world.sessions[ZHANG.name]
    version, body, signature = zhang.split(".")
    return st.one_of(
        st.just([]),
        st.builds(bearer, fs.forged_tokens),
        st.builds(lambda t: [("authorization", t)], st.text(fs.ascii_token_chars, max_size=100)),
        st.sampled_from(
            [
                [("authorization", zhang)],  # no "Bearer "
                [("authorization", "bearer " + zhang)],
                [("authorization", "Basic " + zhang)],
                [("authorization", "Bearer")],
                [("authorization", "Bearer  ")],
                bearer(ADMIN_TOKEN),  # an admin credential is not a session
                bearer(f"{version}.{body[:-2]}AA.{signature}"),  # tampered claims
                bearer(f"{version}.{body}.{signature[:-2]}AA"),  # tampered signature
                bearer(f"{version}.{body}"),
                bearer(zhang + "." + signature),
                [("x-authorization", "Bearer " + zhang)],
            ]
        ),
        st.builds(
            lambda t: bearer(t),
            fs.mutated(st.just(zhang)).filter(
                lambda t: _header_safe(t) and len(t) < MAX_TOKEN and t.strip() != zhang
            ),
        ),
    )


def _lookup_requests(world: World) -> st.SearchStrategy[tuple[str, Message]]:
    lookups = fs.resource_names(["lookups"], world.lookup_names + world.report_names)
    reports = fs.resource_names(["reports"], world.report_names + world.lookup_names)
    bank_code_lists: st.SearchStrategy[list[str]] = st.one_of(
        st.just([]),
        st.lists(st.sampled_from(fs.BANK_CODES), max_size=20),
        st.lists(fs.bank_codes, max_size=5),
        st.lists(st.sampled_from(fs.BANK_CODES), min_size=60, max_size=70),
    )
    return st.one_of(
        st.tuples(
            st.just("CreateLookup"),
            st.builds(
                lookup_pb.CreateLookupRequest,
                request_id=fs.fuzzed(
                    fs.request_ids, st.sampled_from(world.request_ids), st.just("a" * 64), st.just("a" * 65)
                ),
                bank_codes=bank_code_lists,
                # Mostly the terms the person accepted; sometimes none, an old one, or noise.
                consent_terms_version=st.one_of(
                    st.just(TERMS_VERSION),
                    st.just(TERMS_VERSION),
                    st.just(""),
                    st.just("2020-01"),
                    st.text(max_size=40),
                ),
            ),
        ),
        st.tuples(st.just("GetLookup"), st.builds(lookup_pb.GetLookupRequest, name=lookups)),
        st.tuples(
            st.just("WatchLookup"),
            st.builds(lookup_pb.WatchLookupRequest, name=lookups, group_bank_changes=st.booleans()),
        ),
        st.tuples(st.just("GetReport"), st.builds(lookup_pb.GetReportRequest, name=reports)),
        st.tuples(
            st.just("ListReports"),
            st.builds(lookup_pb.ListReportsRequest, page_size=fs.page_sizes, page_token=fs.page_tokens),
        ),
        st.tuples(st.just("DeleteReport"), st.builds(lookup_pb.DeleteReportRequest, name=reports)),
        st.tuples(
            st.just("ListLookups"),
            st.builds(lookup_pb.ListLookupsRequest, page_size=fs.page_sizes, page_token=fs.page_tokens),
        ),
    )


def test_fuzz_lookup(fuzz_stack: FuzzStack, world: World) -> None:
    """Every CardLookupService RPC, once with a valid session of a person and once with a bad credential."""
    with Caller(fuzz_stack, "test_fuzz_lookup") as caller:

        @fuzz_settings("lookup")
        @given(
            rpc_request=_lookup_requests(world),
            persons=st.permutations([ZHANG.name, LI.name, WANG.name, CHEN.name]),
            bad=_bad_credentials(world),
        )
        def check(rpc_request: tuple[str, Message], persons: list[str], bad: list[tuple[str, str]]) -> None:
            name, request = rpc_request
            target = getattr(request, "name", None)
            owner = world.owner_of.get(target) if target else None
            collection = "reports/" if "Report" in name else "lookups/"
            for person in persons[:2]:
                # Another person's lookup or report is answered exactly like a missing one.
                foreign = owner is not None and owner != person and str(target).startswith(collection)
                valid = caller.call(
                    name, request, bearer(world.sessions[person]), expect={C.NOT_FOUND} if foreign else None
                )
                if name == "CreateLookup" and request.consent_terms_version != TERMS_VERSION:
                    # No lookup without consent to the current terms, whatever else the request holds.
                    assert valid.code in {C.INVALID_ARGUMENT, C.FAILED_PRECONDITION}, valid.code
                if valid.code == C.OK and name == "ListReports":
                    reports = valid.responses[0].reports
                    assert all(world.owner_of.get(r.name, person) == person for r in reports)
                if valid.code == C.OK and name == "ListLookups":
                    lookups = valid.responses[0].lookups
                    assert all(world.owner_of.get(lookup.name, person) == person for lookup in lookups)
            caller.call(name, request, bad, expect={C.UNAUTHENTICATED})

        check()


# -- CardActionService -----------------------------------------------------------------------

FRESH = "FRESH-REQUEST-ID"  # replaced by a new request_id at each call
MADE_CLOSURE = "MADE-CLOSURE-"  # "MADE-CLOSURE-7": replaced by one of the closures made so far
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CLOSURE_STATES = set(action_pb.CardClosureState.values()) - {action_pb.CARD_CLOSURE_STATE_UNSPECIFIED}
_FLAG_STATES = set(action_pb.CardFlagState.values()) - {action_pb.CARD_FLAG_STATE_UNSPECIFIED}
MAX_CLOSURE_CARDS = 20


def _near_valid_closures(world: World) -> st.SearchStrategy[Message]:
    """A real report and some of its own card_refs, maybe spoiled by one thing."""
    every_ref = sorted({ref for refs in world.report_cards.values() for ref in refs})

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        report = draw(st.sampled_from(sorted(world.report_cards)))
        own = world.report_cards[report]
        refs = draw(st.lists(st.sampled_from(own), min_size=1, max_size=len(own), unique=True))
        how = draw(
            # "as_is" succeeds, and costs the whole answer_wait (test_card_closure_answers_when_the_banks_do).
            st.sampled_from(["as_is", "foreign", "forged", "mutated", "duplicate", "too_many"])
        )
        index = draw(st.integers(0, len(refs)))
        if how == "foreign":  # a card of another report (another person's)
            refs.insert(index, draw(st.sampled_from([r for r in every_ref if r not in own])))
        elif how == "forged":
            refs.insert(index, draw(fs.union_card_refs))
        elif how == "mutated":
            refs[index % len(refs)] = draw(fs.mutated(st.just(refs[index % len(refs)])))
        elif how == "duplicate":
            refs.insert(index, refs[draw(st.integers(0, len(refs) - 1))])
        elif how == "too_many":
            refs += draw(
                st.lists(
                    fs.union_card_refs, min_size=MAX_CLOSURE_CARDS + 1 - len(refs), max_size=30, unique=True
                )
            )
        request_id = draw(st.one_of(st.just(FRESH), st.just(FRESH), fs.fuzzed(fs.request_ids)))
        return action_pb.CreateCardClosureRequest(request_id=request_id, report=report, card_refs=refs)

    return build()


def _card_action_requests(world: World) -> st.SearchStrategy[tuple[str, Message]]:
    every_ref = sorted({ref for refs in world.report_cards.values() for ref in refs})
    reports = fs.resource_names(
        ["reports"], sorted(world.report_cards) + world.report_names + world.lookup_names
    )
    closure_names = [n for n in world.owner_of if n.startswith("closures/")]
    closures = st.one_of(
        fs.resource_names(["closures"], closure_names + world.report_names),
        st.integers(0, 10_000).map(lambda i: f"{MADE_CLOSURE}{i}"),
    )
    refs = fs.card_refs(every_ref, fs.union_card_refs)
    request_ids = st.one_of(st.just(FRESH), fs.fuzzed(fs.request_ids, st.just("a" * 64), st.just("a" * 65)))
    page_tokens = fs.real_page_tokens(sorted(world.page_tokens))
    ref_lists: st.SearchStrategy[list[str]] = st.one_of(
        st.just([]),
        st.lists(refs, max_size=5),
        st.lists(st.sampled_from(every_ref), min_size=1, max_size=3),  # maybe duplicates
        st.lists(fs.union_card_refs, min_size=MAX_CLOSURE_CARDS - 1, max_size=MAX_CLOSURE_CARDS + 3),
    )
    return st.one_of(
        st.tuples(
            st.just("CreateCardClosure"),
            st.one_of(
                st.builds(
                    action_pb.CreateCardClosureRequest,
                    request_id=request_ids,
                    report=reports,
                    card_refs=ref_lists,
                ),
                _near_valid_closures(world),
            ),
        ),
        st.tuples(st.just("GetCardClosure"), st.builds(action_pb.GetCardClosureRequest, name=closures)),
        st.tuples(
            st.just("ListCardClosures"),
            st.builds(
                action_pb.ListCardClosuresRequest, page_size=fs.list_page_sizes, page_token=page_tokens
            ),
        ),
        st.tuples(
            st.just("FlagCardNotMine"),
            st.one_of(
                st.builds(
                    action_pb.FlagCardNotMineRequest, request_id=request_ids, report=reports, card_ref=refs
                ),
                # A real report with one of its own cards, a card of another report, or a near miss.
                *(
                    st.builds(
                        action_pb.FlagCardNotMineRequest,
                        request_id=st.one_of(st.just(FRESH), st.just(FRESH), request_ids),
                        report=st.just(report),
                        card_ref=st.one_of(st.sampled_from(own), st.sampled_from(own), refs),
                    )
                    for report, own in sorted(world.report_cards.items())
                ),
            ),
        ),
        st.tuples(
            st.just("ListMyAuditEvents"),
            st.builds(
                action_pb.ListMyAuditEventsRequest, page_size=fs.list_page_sizes, page_token=page_tokens
            ),
        ),
    )


def _token_verdict(world: World, token: str, family: str, scope: str, also: str = "") -> set[C] | None:
    """What a page token should get: OK for one of this family and scope, INVALID_ARGUMENT for another real
    token; None (either) for one the test did not make. `also` is a scope that may be accepted as well."""
    if not token:
        return {C.OK}
    known = world.page_tokens.get(token)
    if known is None:
        return None
    if known == (family, scope):
        return {C.OK}
    if also and known == (family, also):
        return {C.OK, C.INVALID_ARGUMENT}
    return {C.INVALID_ARGUMENT}


def _expected_card_action(world: World, person: str, name: str, request: Any) -> set[C] | None:
    """The exact outcome for a request whose answer the test can tell; None for 'any documented code'."""
    if name in ("CreateCardClosure", "FlagCardNotMine"):
        refs = list(request.card_refs) if name == "CreateCardClosure" else [request.card_ref]
        if not _REQUEST_ID.fullmatch(request.request_id):
            return {C.INVALID_ARGUMENT}
        if name == "CreateCardClosure":
            if not refs or len(refs) > MAX_CLOSURE_CARDS or len(set(refs)) != len(refs):
                return {C.INVALID_ARGUMENT}
            asked = world.closure_asks.get((person, request.request_id))
            if asked is not None:  # a retry gets the first closure; another request is refused
                return {C.OK} if asked == (request.report, tuple(sorted(refs))) else {C.INVALID_ARGUMENT}
        if request.report not in world.report_cards:
            return {C.INVALID_ARGUMENT, C.NOT_FOUND}
        if world.owner_of[request.report] != person:
            return {C.NOT_FOUND}  # another person's report is answered like a missing one
        own = world.report_cards[request.report]
        if not all(ref in own for ref in refs):
            return {C.INVALID_ARGUMENT}
        asked_flags = world.flag_asks.get((person, request.request_id), set())
        if name == "FlagCardNotMine" and asked_flags - {(request.report, request.card_ref)}:
            # Refused if that request_id made a flag for another card; taken by none if each time it
            # met a card flagged before.
            return {C.OK, C.INVALID_ARGUMENT}
        return {C.OK}
    if name == "GetCardClosure":
        owner = world.owner_of.get(request.name)
        if owner is None or not request.name.startswith("closures/"):
            return {C.INVALID_ARGUMENT, C.NOT_FOUND}
        return {C.OK} if owner == person else {C.NOT_FOUND}
    if request.page_size < 0:
        return {C.INVALID_ARGUMENT}
    if name == "ListCardClosures":
        return _token_verdict(world, request.page_token, "closures", f"person:{person}")
    return _token_verdict(
        world, request.page_token, "audit", f"person:{person}", also=f"actor:{world.actors[person]}"
    )


def _check_no_pii(world: World, events: Sequence[Any]) -> None:
    """Audit events hold no name or ID number."""
    private = [
        value
        for p in (ZHANG, LI, WANG, LIU, CHEN, *world.action_people)
        for value in (p.name, p.resident_id_number)
    ]
    for event in events:
        text = f"{event.actor} {event.action} {event.outcome} {event.resource}"
        assert not any(value in text for value in private), event


def _check_card_action_answer(world: World, person: str, name: str, request: Any, outcome: Outcome) -> None:
    """Invariants of a successful answer; records new closures (and their owners) in the world."""
    response = outcome.responses[0]
    if name == "CreateCardClosure":
        closure = response.closure
        assert closure.name.startswith("closures/")
        assert all(item.state in _CLOSURE_STATES for item in closure.items), closure
        first = world.closure_requests.get((person, request.request_id))
        if first is not None:
            assert closure.name == first, "a retry with the same request_id made another closure"
        else:
            assert closure.report == request.report
            assert [item.card_ref for item in closure.items] == list(request.card_refs)
            assert closure.request_id == "", "the request_id a client typed is never echoed"
            assert world.owner_of.setdefault(closure.name, person) == person
            world.closure_requests[(person, request.request_id)] = closure.name
            world.closure_asks[(person, request.request_id)] = (
                request.report,
                tuple(sorted(request.card_refs)),
            )
    elif name == "GetCardClosure":
        assert response.closure.name == request.name
        assert all(item.state in _CLOSURE_STATES for item in response.closure.items)
    elif name == "ListCardClosures":
        assert all(world.owner_of.get(c.name, person) == person for c in response.closures), response
        assert len(response.closures) <= (request.page_size or 10)
    elif name == "FlagCardNotMine":
        flag = response.flag
        assert flag.card_ref == request.card_ref
        world.flag_asks.setdefault((person, request.request_id), set()).add(
            (request.report, request.card_ref)
        )
        assert flag.state in _FLAG_STATES, flag
        if flag.state == action_pb.CARD_FLAG_STATE_FROZEN:
            assert flag.case_number.startswith(f"FR-{flag.bank_code}-"), flag
    elif name == "ListMyAuditEvents":
        events = response.events
        assert all(e.actor == world.actors[person] for e in events), "another actor's event was listed"
        assert len(events) <= min(request.page_size or 50, 500)
        _check_no_pii(world, events)


def test_fuzz_card_actions(fuzz_stack: FuzzStack, world: World) -> None:
    """Every CardActionService RPC, with two persons' valid sessions (owner or not) and a bad credential.

    The two card holders' reports are real; ZHANG's report (which the lookup fuzz may have deleted) and
    CHEN (no report) stand for other people.
    """
    with Caller(fuzz_stack, "test_fuzz_card_actions") as caller:

        @fuzz_settings("card_actions")
        @given(
            rpc_request=_card_action_requests(world),
            persons=st.permutations([*(p.name for p in world.action_people), ZHANG.name, CHEN.name]),
            bad=_bad_credentials(world),
            retry=st.booleans(),
        )
        def check(
            rpc_request: tuple[str, Message], persons: list[str], bad: list[tuple[str, str]], retry: bool
        ) -> None:
            name, template = rpc_request
            request: Any = type(template)()
            request.CopyFrom(template)
            if getattr(request, "request_id", None) == FRESH:
                request.request_id = "fz-" + uuid.uuid4().hex
            if name == "GetCardClosure" and request.name.startswith(MADE_CLOSURE):
                made = sorted(set(world.closure_requests.values()))
                request.name = made[int(request.name.removeprefix(MADE_CLOSURE)) % len(made)]
            for person in persons[:2]:
                expect = _expected_card_action(world, person, name, request)
                valid = caller.call(name, request, bearer(world.sessions[person]), expect=expect)
                if valid.code == C.OK:
                    _check_card_action_answer(world, person, name, request, valid)
                    if retry and name in ("CreateCardClosure", "FlagCardNotMine"):
                        again = caller.call(name, request, bearer(world.sessions[person]), expect={C.OK})
                        first, second = valid.responses[0], again.responses[0]
                        if name == "CreateCardClosure":
                            assert second.closure.name == first.closure.name
                        else:
                            assert second.flag.card_ref == first.flag.card_ref
                            assert second.flag.create_time == first.flag.create_time
            caller.call(name, request, bad, expect={C.UNAUTHENTICATED})

        check()


# -- AdminService ------------------------------------------------------------------------


def _timestamp(value: tuple[int, int] | None) -> Timestamp | None:
    return None if value is None else Timestamp(seconds=value[0], nanos=value[1])


def _audit_requests(world: World) -> st.SearchStrategy[admin_pb.ListAuditEventsRequest]:
    """Actor filters (real hashes, near misses), time ranges (also reversed, also extreme), page tokens."""
    return st.builds(
        lambda actor, start, end, size, token: admin_pb.ListAuditEventsRequest(
            actor=actor,
            start_time=_timestamp(start),
            end_time=_timestamp(end),
            page_size=size,
            page_token=token,
        ),
        fs.actor_filters(sorted(world.actors.values())),
        fs.timestamps,
        fs.timestamps,
        fs.list_page_sizes,
        fs.real_page_tokens(sorted(world.page_tokens)),
    )


_AUDIT_ACTOR = re.compile(r"[0-9a-f]{64}|admin:console|admin:c[0-9a-f]{16}")
_PORT_ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,253}:([0-9]{1,5})")


def _when(timestamp: Timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)


def _expected_admin(world: World, name: str, request: Any) -> set[C] | None:
    if name == "CreateBank" and request.bank.code in fs.BANK_CODES:
        return {C.INVALID_ARGUMENT, C.ALREADY_EXISTS}  # a participating bank's code is taken
    if name == "UpdateBank" and request.address:
        port = _PORT_ADDRESS.fullmatch(request.address)
        if port is None or not 0 < int(port.group(1)) < 65536:
            return {C.INVALID_ARGUMENT}  # no host:port, or a port outside 1-65535
    if name != "ListAuditEvents":
        return None
    actor = request.actor
    if actor and actor != "admin" and not _AUDIT_ACTOR.fullmatch(actor):
        return {C.INVALID_ARGUMENT}
    if request.page_size < 0:
        return {C.INVALID_ARGUMENT}
    both = request.HasField("start_time") and request.HasField("end_time")
    if both and _when(request.start_time) > _when(request.end_time):
        return {C.INVALID_ARGUMENT}
    person = next((p for p, hash_ in world.actors.items() if hash_ == actor), "")
    return _token_verdict(
        world, request.page_token, "audit", f"actor:{actor}" if actor else "*", also=f"person:{person}"
    )


def _check_audit_answer(world: World, request: admin_pb.ListAuditEventsRequest, outcome: Outcome) -> None:
    events = outcome.responses[0].events
    assert len(events) <= min(request.page_size or 50, 500)
    times = [_when(e.time) for e in events]
    assert times == sorted(times, reverse=True), "not newest first"
    if request.actor:
        assert all(e.actor == request.actor for e in events), "an event of another actor"
    if request.HasField("start_time"):
        assert all(t >= _when(request.start_time) for t in times), "an event before start_time"
    if request.HasField("end_time"):
        assert all(t < _when(request.end_time) for t in times), "an event at or after end_time"
    _check_no_pii(world, events)


def _admin_requests(world: World) -> st.SearchStrategy[tuple[str, Message]]:
    return st.one_of(
        st.tuples(
            st.just("ListBanks"),
            st.builds(admin_pb.ListBanksRequest, page_size=fs.page_sizes, page_token=fs.page_tokens),
        ),
        st.tuples(
            st.just("UpdateBank"),
            # Addresses are left empty (kept) most of the time so the banks stay reachable.
            st.builds(
                admin_pb.UpdateBankRequest,
                code=fs.bank_codes,
                enabled=st.booleans(),
                address=st.one_of(st.just(""), st.just(""), fs.addresses),
            ),
        ),
        st.tuples(
            st.just("CreateBank"),
            # Mostly valid banks (some with a taken code or CNAPS code), some with any field spoiled.
            st.builds(
                admin_pb.CreateBankRequest,
                bank=st.builds(
                    admin_pb.Bank,
                    code=st.one_of(
                        st.sampled_from(fs.BANK_CODES),
                        st.from_regex(r"[A-Z]{2,5}", fullmatch=True),
                        fs.bank_codes,
                    ),
                    name=st.one_of(st.just("测试银行"), st.text(max_size=40)),
                    english_name=st.one_of(st.just("Test Bank"), st.text(max_size=40)),
                    interbank_code=st.one_of(st.from_regex(r"[0-9]{3}", fullmatch=True), st.text(max_size=5)),
                    address=st.one_of(st.just("127.0.0.1:9"), fs.addresses),
                    tls_name=st.one_of(
                        st.just(""), st.just("test.bank.cardlookup.test"), st.text(max_size=20)
                    ),
                ),
            ),
        ),
        st.tuples(
            st.just("ListRegions"),
            st.builds(admin_pb.ListRegionsRequest, page_size=fs.page_sizes, page_token=fs.page_tokens),
        ),
        st.tuples(
            st.just("UpdateRegion"),
            st.builds(admin_pb.UpdateRegionRequest, code=fs.region_codes, open=st.booleans()),
        ),
        st.tuples(st.just("GetServiceStats"), st.just(admin_pb.GetServiceStatsRequest())),
        st.tuples(st.just("ListAuditEvents"), _audit_requests(world)),
        st.tuples(st.just("ListAuditEvents"), _audit_requests(world)),
    )


def test_fuzz_admin(fuzz_stack: FuzzStack, world: World) -> None:
    original = {code: bank.address for code, bank in fuzz_stack.banks.items()}
    bad_admin: st.SearchStrategy[list[tuple[str, str]]] = st.one_of(
        st.just([]),
        st.builds(bearer, st.text(fs.ascii_token_chars, max_size=80)),
        st.builds(
            bearer,
            fs.mutated(st.just(ADMIN_TOKEN)).filter(
                lambda t: _header_safe(t) and len(t) < MAX_TOKEN and t.strip() != ADMIN_TOKEN
            ),
        ),
        st.sampled_from(
            [
                [("authorization", ADMIN_TOKEN)],
                [("authorization", "bearer " + ADMIN_TOKEN)],
                bearer(world.sessions[ZHANG.name]),  # a session is not an admin credential
            ]
        ),
    )
    try:
        with Caller(fuzz_stack, "test_fuzz_admin") as caller:

            @fuzz_settings("admin")
            @given(rpc_request=_admin_requests(world), bad=bad_admin)
            def check(rpc_request: tuple[str, Message], bad: list[tuple[str, str]]) -> None:
                name, request = rpc_request
                expect = _expected_admin(world, name, request)
                outcome = caller.call(name, request, bearer(ADMIN_TOKEN), expect=expect)
                if outcome.code == C.OK and isinstance(request, admin_pb.ListAuditEventsRequest):
                    _check_audit_answer(world, request, outcome)
                if outcome.code == C.OK and isinstance(request, admin_pb.CreateBankRequest):
                    joined = outcome.responses[0].bank
                    assert (joined.code, joined.enabled) == (request.bank.code, True)
                    # It has no server: disabled at once, so no lookup elsewhere waits for it.
                    disable = admin_pb.UpdateBankRequest(code=joined.code, update_mask={"paths": ["enabled"]})
                    caller.call("UpdateBank", disable, bearer(ADMIN_TOKEN), expect={C.OK})
                caller.call(name, request, bad, expect={C.UNAUTHENTICATED})
                caller.call(name, request, [], expect={C.UNAUTHENTICATED})

            check()
    finally:
        # Leave every bank enabled at its real address and the pilot regions open for what follows;
        # a bank the fuzz registered (and may have enabled again with a fuzzed UpdateBank) is disabled.
        with Caller(fuzz_stack, "setup") as caller:
            listed = caller.call("ListBanks", admin_pb.ListBanksRequest(), bearer(ADMIN_TOKEN), expect={C.OK})
            for bank in listed.responses[0].banks:
                if bank.code not in original and bank.enabled:
                    caller.call(
                        "UpdateBank",
                        admin_pb.UpdateBankRequest(code=bank.code, update_mask={"paths": ["enabled"]}),
                        bearer(ADMIN_TOKEN),
                        expect={C.OK},
                    )
            for code, address in original.items():
                caller.call(
                    "UpdateBank",
                    admin_pb.UpdateBankRequest(code=code, enabled=True, address=address),
                    bearer(ADMIN_TOKEN),
                    expect={C.OK},
                )
            for person in (ZHANG, LI, LIU, CHEN):
                caller.call(
                    "UpdateRegion",
                    admin_pb.UpdateRegionRequest(code=person.region_code, open=True),
                    bearer(ADMIN_TOKEN),
                    expect={C.OK},
                )


# -- BankQueryService ----------------------------------------------------------------------


def _check_bank_answer(bank: str, responses: list[bank_pb.QueryCardsResponse]) -> None:
    """A complete answer: cards, then one summary that counts them; only masked numbers."""
    assert responses
    assert responses[-1].WhichOneof("result") == "summary"
    cards = [r.card for r in responses[:-1]]
    assert all(r.WhichOneof("result") == "card" for r in responses[:-1])
    assert responses[-1].summary.bank_code == bank
    assert responses[-1].summary.record_count == len(cards)
    for card in cards:
        assert card.bank_code == bank
        assert re.fullmatch(r"[0-9]{4}", card.first_four)
        assert re.fullmatch(r"[0-9]{4}", card.last_four)
        assert 16 <= card.number_length <= 19


def _check_session_agrees(
    caller: Caller,
    bank: str,
    query: bank_pb.QueryCardsRequest,
    metadata: list[tuple[str, str]],
    per_call: Outcome,
) -> None:
    """The same query on a QuerySession stream gets the same answer as QueryCards, in one message
    carrying its query_id; a query QueryCards refuses is refused in the stream, which goes on (OK).
    Sent alone on a QueryBatchSession stream, it gets that same answer in a batch of one."""
    request = bank_pb.QuerySessionRequest(
        query_id=query.query_id, resident_id_number=query.resident_id_number, name=query.name
    )
    outcome = caller.call("QuerySession", request, metadata, bank=bank, expect={C.OK})
    assert len(outcome.responses) == 1, outcome.responses
    answer = outcome.responses[0]
    batch = bank_pb.QueryBatchSessionRequest(queries=[request])
    batched = caller.call("QueryBatchSession", batch, metadata, bank=bank, expect={C.OK})
    assert [list(message.answers) for message in batched.responses] == [[answer]], batched.responses
    assert answer.query_id == query.query_id
    if per_call.code == C.OK:
        assert answer.WhichOneof("result") == "answer", answer
        streamed = [r.card for r in per_call.responses[:-1]]
        assert list(answer.answer.cards) == streamed
        assert answer.answer.summary == per_call.responses[-1].summary
    else:
        assert answer.WhichOneof("result") == "error", answer
        assert answer.error.code == per_call.code.value[0], (answer.error, per_call.code)
        # Field names only: the query's ID number and name are never echoed.
        for secret in (query.resident_id_number, query.name):
            if len(secret) >= 4:
                assert secret not in answer.error.message


CardAction = bank_pb.CloseCardRequest | bank_pb.ReportCardNotMineRequest
_ACTION_TYPES = {"CloseCard": bank_pb.CloseCardRequest, "ReportCardNotMine": bank_pb.ReportCardNotMineRequest}


def _query_requests(world: World) -> st.SearchStrategy[Message]:
    persons = st.sampled_from([ZHANG, LI, WANG, LIU, CHEN, *world.registered])
    return st.one_of(
        st.builds(
            bank_pb.QueryCardsRequest,
            query_id=fs.fuzzed(fs.request_ids, st.just("q" * 64), st.just("q" * 65)),
            resident_id_number=fs.id_numbers,
            name=fs.names,
        ),
        st.builds(
            lambda p, q, which, value: bank_pb.QueryCardsRequest(
                query_id=q,
                resident_id_number=value if which == 0 else p.resident_id_number,
                name=value if which == 1 else p.name,
            ),
            persons,
            fs.request_ids,
            st.integers(0, 2),
            fs.fuzzed(fs.resident_ids(), fs.chinese_names),
        ),
    )


def _bank_action_requests(world: World) -> st.SearchStrategy[tuple[str, Message]]:
    """CloseCard / ReportCardNotMine: arbitrary, or a real card asked for by its holder or someone else."""
    holders = [p for p in (ZHANG, LI, LIU) if world.bank_cards[p.name]]
    every_ref = sorted({ref for cards in world.bank_cards.values() for _, ref in cards})
    askers = st.sampled_from([ZHANG, LI, WANG, LIU, CHEN, *world.registered[:10]])
    request_ids = st.one_of(st.just(FRESH), fs.fuzzed(fs.request_ids, st.just("q" * 64), st.just("q" * 65)))

    def arbitrary(name: str) -> st.SearchStrategy[Message]:
        return st.builds(
            _ACTION_TYPES[name],
            request_id=request_ids,
            card_ref=fs.card_refs(every_ref, fs.bank_card_refs),
            resident_id_number=fs.id_numbers,
            name=fs.names,
        )

    @st.composite
    def near_valid(draw: st.DrawFn, name: str) -> Message:
        holder = draw(st.sampled_from(holders))
        _, ref = draw(st.sampled_from(world.bank_cards[holder.name]))
        asker = draw(st.one_of(st.just(holder), st.just(holder), askers))
        request: Any = _ACTION_TYPES[name](
            request_id=draw(st.one_of(st.just(FRESH), st.just(FRESH), request_ids)),
            card_ref=ref,
            resident_id_number=asker.resident_id_number,
            name=asker.name,
        )
        spoil = draw(st.sampled_from(["none", "none", "none", "other_name", "card_ref", "id", "name"]))
        if spoil == "other_name":  # the asker's ID number with someone else's (valid) name
            request.name = draw(st.sampled_from([p.name for p in (ZHANG, LI, WANG, LIU) if p != asker]))
        elif spoil == "card_ref":
            request.card_ref = draw(fs.mutated(st.just(ref)))
        elif spoil == "id":
            request.resident_id_number = draw(fs.mutated(st.just(asker.resident_id_number)))
        elif spoil == "name":
            request.name = draw(fs.mutated(st.just(asker.name)))
        return cast(Message, request)

    return st.one_of(
        *(
            st.tuples(st.just(name), st.one_of(arbitrary(name), near_valid(name), near_valid(name)))
            for name in sorted(_ACTION_TYPES)
        )
    )


def _card_bank(world: World, ref: str) -> str | None:
    return next((bank for cards in world.bank_cards.values() for bank, r in cards if r == ref), None)


def _expected_bank_action(world: World, bank: str, request: CardAction, fresh: bool) -> set[C] | None:
    """Exact for a fresh request_id, a known person's ID number with a known name and a real card_ref."""
    known = (ZHANG, LI, WANG, LIU, CHEN, *world.registered[:10])
    if not fresh or request.resident_id_number not in {p.resident_id_number for p in known}:
        return None
    if request.name not in {p.name for p in known} or _card_bank(world, request.card_ref) is None:
        return None
    holder = next((p for p in (ZHANG, LI, LIU) if (bank, request.card_ref) in world.bank_cards[p.name]), None)
    mine = holder is not None and (holder.resident_id_number, holder.name) == (
        request.resident_id_number,
        request.name,
    )
    return {C.OK} if mine else {C.NOT_FOUND}  # another person's card, or the name does not match


def _check_bank_action(bank: str, name: str, request: CardAction, outcome: Outcome) -> None:
    response = outcome.responses[0]
    if name == "CloseCard":
        assert response.ticket_id.startswith(f"T-{bank}-"), response
        assert response.outcome != bank_pb.CLOSURE_OUTCOME_UNSPECIFIED, response
    else:
        assert response.case_number.startswith(f"FR-{bank}-"), response
        assert response.status in (bank_pb.CARD_STATUS_FROZEN, bank_pb.CARD_STATUS_UNSPECIFIED), response


def _check_card_afterwards(caller: Caller, bank: str, name: str, request: CardAction, response: Any) -> None:
    """A closed card is gone from QueryCards; a card reported as not mine is listed as frozen (or closed)."""
    answer = caller.call(
        "QueryCards",
        bank_pb.QueryCardsRequest(
            query_id="follow-up", resident_id_number=request.resident_id_number, name=request.name
        ),
        bank=bank,
        expect={C.OK},
    )
    _check_bank_answer(bank, answer.responses)
    listed = {r.card.card_ref: r.card.status for r in answer.responses[:-1]}
    if name == "CloseCard" and response.outcome == bank_pb.CLOSURE_OUTCOME_CLOSED:
        assert request.card_ref not in listed, "a closed card is still reported"
    elif name == "ReportCardNotMine":
        closed = response.status == bank_pb.CARD_STATUS_UNSPECIFIED
        assert listed.get(request.card_ref) == (None if closed else bank_pb.CARD_STATUS_FROZEN), listed


def test_fuzz_bank(fuzz_stack: FuzzStack, world: World) -> None:
    """QueryCards (and the same query on a QuerySession stream), CloseCard and ReportCardNotMine,
    each request sent to two banks."""
    requests = st.one_of(
        st.tuples(st.just("QueryCards"), _query_requests(world)), _bank_action_requests(world)
    )
    with Caller(fuzz_stack, "test_fuzz_bank") as caller:

        @fuzz_settings("bank")
        @given(
            rpc_request=requests,
            banks=st.permutations(fs.BANK_CODES),
            metadata=st.one_of(st.just([]), st.builds(bearer, fs.forged_tokens)),
            follow_up=st.booleans(),
        )
        def check(
            rpc_request: tuple[str, Message],
            banks: list[str],
            metadata: list[tuple[str, str]],
            follow_up: bool,
        ) -> None:
            name, template = rpc_request
            if name == "QueryCards":
                codes = set()
                for bank in banks[:2]:
                    outcome = caller.call("QueryCards", template, metadata, bank=bank)
                    codes.add(outcome.code)
                    if outcome.code == C.OK:
                        _check_bank_answer(bank, outcome.responses)
                    if bank == banks[0]:
                        _check_session_agrees(caller, bank, template, metadata, outcome)
                # Validation does not depend on which bank is asked (nor does existence leak through errors).
                assert len(codes) == 1, codes
                return
            request: Any = type(template)()
            request.CopyFrom(template)
            fresh = request.request_id == FRESH
            if fresh:
                request.request_id = "fz-" + uuid.uuid4().hex
            # The card's own bank first (when it is a real card), then another one.
            home = _card_bank(world, request.card_ref)
            targets = [home, *[b for b in banks if b != home][:1]] if home else banks[:2]
            for bank in targets:
                expect = _expected_bank_action(world, bank, request, fresh)
                outcome = caller.call(name, request, metadata, bank=bank, expect=expect)
                if outcome.code != C.OK:
                    continue
                _check_bank_action(bank, name, request, outcome)
                if follow_up:
                    _check_card_afterwards(caller, bank, name, request, outcome.responses[0])
                else:  # a retry gets the first answer
                    again = caller.call(name, request, metadata, bank=bank, expect={C.OK})
                    assert again.responses[0] == outcome.responses[0], "a retry got another answer"

        check()


# -- every RPC: oversized requests and raw wire bytes -------------------------------------------


def _padded(name: str, size: int) -> Message:
    """A near-valid request of the RPC with its first string field blown up to `size` characters
    (in its first message field, e.g. a batch's one query, when it has no string of its own)."""
    request = RPCS[name].request()
    _pad(request, size)
    return request


def _pad(message: Message, size: int) -> bool:
    fields = message.DESCRIPTOR.fields
    for descriptor in fields:
        if descriptor.type == descriptor.TYPE_STRING:
            if descriptor.is_repeated:
                getattr(message, descriptor.name).append("A" * size)
            else:
                setattr(message, descriptor.name, "A" * size)
            return True
    for descriptor in fields:
        if descriptor.type == descriptor.TYPE_MESSAGE and descriptor.message_type.fields:
            inner = getattr(message, descriptor.name)
            if _pad(inner.add() if descriptor.is_repeated else inner, size):
                return True
            if descriptor.is_repeated:
                del inner[:]
    return False


def test_fuzz_oversized(fuzz_stack: FuzzStack, world: World) -> None:
    """Requests over 64 KiB, or metadata over 16 KiB: the transport refuses them (RESOURCE_EXHAUSTED)."""
    with Caller(fuzz_stack, "test_fuzz_oversized") as caller:

        @fuzz_settings("oversized")
        @given(
            name=st.sampled_from(list(RPCS)),
            size=st.integers(MAX_RECEIVE_MESSAGE_BYTES + 1, 4 * MAX_RECEIVE_MESSAGE_BYTES),
            huge_metadata=st.booleans(),
            bank=st.sampled_from(fs.BANK_CODES),
        )
        def check(name: str, size: int, huge_metadata: bool, bank: str) -> None:
            if name in ("GetServiceStats", "SignOut"):  # no string field to blow up
                huge_metadata = True
            auth = _credential(world, name)
            if huge_metadata:
                request, metadata = _padded(name, 3), bearer("A" * (METADATA_HARD_LIMIT + size % 20000))
            else:
                request, metadata = _padded(name, size), auth
            caller.call(
                name,
                request,
                metadata,
                bank=bank if name in BANK_RPCS else None,
                expect={C.RESOURCE_EXHAUSTED},
            )

        check()


def _parses(name: str, data: bytes) -> bool:
    try:
        RPCS[name].request.FromString(data)
    except DecodeError:
        return False
    return True


def _wire_bytes(name: str) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and valid serialisations with bytes appended, flipped or cut off."""
    valid = st.sampled_from(
        [
            _padded(name, 3).SerializeToString(),
            RPCS[name].request().SerializeToString(),
            identity_pb.StartVerificationRequest(
                name=ZHANG.name, resident_id_number=ZHANG.resident_id_number, mobile_number="1"
            ).SerializeToString(),
        ]
    )
    return st.one_of(
        st.binary(max_size=200),
        st.builds(lambda v, extra: v + extra, valid, st.binary(min_size=1, max_size=40)),
        st.builds(
            lambda v, i, b: v[: i % (len(v) or 1)] + bytes([b]) + v[i % (len(v) or 1) + 1 :],
            valid,
            st.integers(0, 200),
            st.integers(0, 255),
        ),
        st.builds(lambda v, i: v[: i % (len(v) or 1)], valid, st.integers(0, 200)),
        # Unknown fields (field numbers 10-99, every wire type) must simply be ignored.
        st.builds(
            lambda v, number, payload: v + bytes([number << 3 | 2, len(payload)]) + payload,
            valid,
            st.integers(10, 15),
            st.binary(max_size=20),
        ),
    )


def test_fuzz_raw_bytes(fuzz_stack: FuzzStack, world: World) -> None:
    """Raw wire bytes to every RPC: bytes that parse get documented codes, the rest INVALID_ARGUMENT."""
    tally = {"parsed": 0, "unparseable": 0}
    with Caller(fuzz_stack, "test_fuzz_raw_bytes") as caller:

        @fuzz_settings("raw_bytes")
        @given(data=st.data(), name=st.sampled_from(list(RPCS)), bank=st.sampled_from(fs.BANK_CODES))
        def check(data: st.DataObject, name: str, bank: str) -> None:
            raw = data.draw(_wire_bytes(name))
            auth = _credential(world, name)
            tally["parsed" if _parses(name, raw) else "unparseable"] += 1
            caller.call(name, raw, auth, bank=bank if name in BANK_RPCS else None)

        check()
    print(f"raw bytes: {tally}")


@pytest.mark.parametrize("name", list(RPCS))
def test_unparseable_bytes_get_invalid_argument(fuzz_stack: FuzzStack, world: World, name: str) -> None:
    """Invalid UTF-8 in a string field, a truncated varint: INVALID_ARGUMENT, with or without a credential."""
    auth = _credential(world, name)
    strings = [f.number for f in RPCS[name].request.DESCRIPTOR.fields if f.type == f.TYPE_STRING]
    bad_utf8 = [bytes([number << 3 | 2, 2, 0xFF, 0xFE]) for number in strings[:1]]
    with Caller(fuzz_stack, "setup") as caller:
        for raw in [*bad_utf8, b"\xff\xff\xff", b"\x08", b"\x12\x05ab"]:
            assert not _parses(name, raw), raw
            for metadata in (auth, []):
                caller.call(
                    name,
                    raw,
                    metadata,
                    bank="ICBC" if name in BANK_RPCS else None,
                    expect={C.INVALID_ARGUMENT},
                )


# -- near-valid identifiers must be INVALID_ARGUMENT, not something further down ---------------------

# Both used to pass validation (a regex `$` matches before a trailing "\n", `\d` any Unicode digit, and
# int() reads fullwidth digits); now validation uses fullmatch with ASCII digits.
_NEAR_VALID_ID = ZHANG.resident_id_number + "\n"
# A valid-shaped number whose check character is "X", in fullwidth digits.
_FULLWIDTH_ID = "31010419850312003X".translate(str.maketrans("0123456789", "０１２３４５６７８９"))
_ADDRESS_CASES = {
    "admin_address_port": "127.0.0.1:99999\n",
    "admin_address_port_zero": "127.0.0.1:0",
    "admin_address_port_high": "127.0.0.1:65536",
    "admin_address_newline": "127.0.0.1:50061\n",
}


@pytest.mark.parametrize(
    "case",
    [
        "complete_code_newline",
        "create_request_id_newline",
        "bank_query_id_newline",
        "bank_id_fullwidth",
        "admin_region_newline",
        *_ADDRESS_CASES,
        "closure_request_id_newline",
        "closure_request_id_fullwidth",
        "flag_request_id_newline",
        "bank_close_request_id_newline",
        "bank_close_id_newline",
        "bank_not_mine_id_fullwidth",
        "bank_not_mine_request_id_fullwidth",
        "audit_actor_newline",
        "audit_actor_upper",
    ],
)
def test_near_valid_identifiers_are_invalid_argument(fuzz_stack: FuzzStack, world: World, case: str) -> None:
    zhang = bearer(world.sessions[ZHANG.name])
    admin = bearer(ADMIN_TOKEN)
    verification_id, right = world.verifications[-1]
    report = next(r for r in world.report_cards if world.owner_of[r] == world.action_people[0].name)
    card = world.report_cards[report][-1]
    bank_code, bank_ref = world.bank_cards[ZHANG.name][-1]
    holder = {"resident_id_number": ZHANG.resident_id_number, "name": ZHANG.name}
    requests: dict[str, tuple[str, Message, list[tuple[str, str]], str | None]] = {
        "complete_code_newline": (
            "CompleteVerification",
            identity_pb.CompleteVerificationRequest(
                verification_id=verification_id, code=f"{(int(right) + 1) % 1_000_000:06d}\n"
            ),
            [],
            None,
        ),
        "create_request_id_newline": (
            "CreateLookup",
            lookup_pb.CreateLookupRequest(request_id="req-1\n", consent_terms_version=TERMS_VERSION),
            zhang,
            None,
        ),
        "bank_query_id_newline": (
            "QueryCards",
            bank_pb.QueryCardsRequest(query_id="q-1\n", resident_id_number=_NEAR_VALID_ID, name=ZHANG.name),
            [],
            "ICBC",
        ),
        "bank_id_fullwidth": (
            "QueryCards",
            bank_pb.QueryCardsRequest(query_id="q-2", resident_id_number=_FULLWIDTH_ID, name=ZHANG.name),
            [],
            "ICBC",
        ),
        "admin_region_newline": (
            "UpdateRegion",
            admin_pb.UpdateRegionRequest(code="310000\n", open=True),
            admin,
            None,
        ),
        **{
            case: (
                "UpdateBank",
                admin_pb.UpdateBankRequest(code="CZB", enabled=True, address=address),
                admin,
                None,
            )
            for case, address in _ADDRESS_CASES.items()
        },
        "closure_request_id_newline": (
            "CreateCardClosure",
            action_pb.CreateCardClosureRequest(request_id="req-1\n", report=report, card_refs=[card]),
            zhang,
            None,
        ),
        "closure_request_id_fullwidth": (
            "CreateCardClosure",
            action_pb.CreateCardClosureRequest(request_id="１２３", report=report, card_refs=[card]),
            zhang,
            None,
        ),
        "flag_request_id_newline": (
            "FlagCardNotMine",
            action_pb.FlagCardNotMineRequest(request_id="req-2\n", report=report, card_ref=card),
            zhang,
            None,
        ),
        "bank_close_request_id_newline": (
            "CloseCard",
            bank_pb.CloseCardRequest(request_id="r-1\n", card_ref=bank_ref, **holder),
            [],
            bank_code,
        ),
        "bank_close_id_newline": (
            "CloseCard",
            bank_pb.CloseCardRequest(
                request_id="r-2", card_ref=bank_ref, resident_id_number=_NEAR_VALID_ID, name=ZHANG.name
            ),
            [],
            bank_code,
        ),
        "bank_not_mine_id_fullwidth": (
            "ReportCardNotMine",
            bank_pb.ReportCardNotMineRequest(
                request_id="r-3", card_ref=bank_ref, resident_id_number=_FULLWIDTH_ID, name=ZHANG.name
            ),
            [],
            bank_code,
        ),
        "bank_not_mine_request_id_fullwidth": (
            "ReportCardNotMine",
            bank_pb.ReportCardNotMineRequest(request_id="r-４", card_ref=bank_ref, **holder),
            [],
            bank_code,
        ),
        "audit_actor_newline": (
            "ListAuditEvents",
            admin_pb.ListAuditEventsRequest(actor=world.actors[ZHANG.name] + "\n"),
            admin,
            None,
        ),
        "audit_actor_upper": (
            "ListAuditEvents",
            admin_pb.ListAuditEventsRequest(actor=world.actors[ZHANG.name].upper()),
            admin,
            None,
        ),
    }
    name, request, metadata, bank = requests[case]
    with Caller(fuzz_stack, "setup") as caller:
        try:
            caller.call(name, request, metadata, bank=bank, expect={C.INVALID_ARGUMENT})
        finally:
            if case in _ADDRESS_CASES:
                caller.call(
                    "UpdateBank",
                    admin_pb.UpdateBankRequest(
                        code="CZB", enabled=True, address=fuzz_stack.banks["CZB"].address
                    ),
                    admin,
                    expect={C.OK},
                )


def test_every_served_rpc_is_fuzzed() -> None:
    """A new RPC on the union or the banks needs its entry (documented codes, strategies) here."""
    from google.protobuf import descriptor_pool

    from server.bank.service import SERVICE_NAME as BANK_SERVICE
    from server.union.union_server import SERVICE_NAMES

    pool = descriptor_pool.Default()
    served = {
        f"/{service}/{method.name}"
        for service in [*SERVICE_NAMES, BANK_SERVICE]
        for method in pool.FindServiceByName(service).methods
    }
    missing = served - {rpc.path for rpc in RPCS.values()}
    assert not missing, f"RPCs served but not fuzzed (add them to RPCS and a strategy): {sorted(missing)}"


def test_every_accepted_code_is_documented_in_the_protos() -> None:
    """RPCS is a copy of the protos' "Status codes:" lists (it may accept fewer, where the fuzzing
    cannot cause a code): a code the servers may answer must be in the RPC's own comment too."""
    documented: dict[str, set[str]] = {}
    for proto in (Path(__file__).parents[2] / "protos").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for index, line in enumerate(lines):
            if (rpc := re.match(r"\s*rpc (\w+)\(", line)) is None:
                continue
            comment = []
            for above in reversed(lines[:index]):
                if not above.strip().startswith("//"):
                    break
                comment.append(above)
            documented[rpc.group(1)] = set(re.findall(r"//\s*- ([A-Z_]+)[:.]", "\n".join(comment)))
    # The client's own doing, on a stream it follows: it cancels, or its deadline passes.
    client_side = {"CANCELLED", "DEADLINE_EXCEEDED"}
    for name, rpc in RPCS.items():
        accepted = {code.name for code in rpc.documented}
        extra = accepted - documented[name] - (client_side if rpc.stream else set())
        assert not extra, f"{name} accepts {sorted(extra)}, which its comment in protos/ does not list"


# -- afterwards: still healthy, still working, and enough requests were sent ------------------------


def test_servers_still_healthy_and_enough_requests(fuzz_stack: FuzzStack, world: World) -> None:
    """Last in the module: health SERVING everywhere, a normal flow works, nothing was logged as unhandled."""
    with Caller(fuzz_stack, "setup") as caller:
        for channel in [caller.union, *caller.bank_channels.values()]:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # A person the fuzz never touched verifies, reads reports, and an operator lists banks.
        token = fuzz_stack.verify(caller.union, LIU)
        reports = caller.call("ListReports", lookup_pb.ListReportsRequest(), bearer(token), expect={C.OK})
        assert reports.responses[0].reports == []
        zhang = bearer(world.sessions[ZHANG.name])
        # A lookup is served while its report is: the fuzz may have deleted the report, and the
        # lookup with it.
        kept = caller.call("ListReports", lookup_pb.ListReportsRequest(page_size=100), zhang, expect={C.OK})
        kept_lookups = {report.lookup for report in kept.responses[0].reports}
        for lookup in [n for n, owner in world.owner_of.items() if owner == ZHANG.name and "lookups/" in n]:
            expected = {C.OK} if lookup in kept_lookups else {C.NOT_FOUND}
            caller.call("GetLookup", lookup_pb.GetLookupRequest(name=lookup), zhang, expect=expected)
        banks = caller.call("ListBanks", admin_pb.ListBanksRequest(), bearer(ADMIN_TOKEN), expect={C.OK})
        # The 16 in their order and enabled; after them only banks the fuzz registered, each disabled
        # at once (CreateBank adds a bank, nothing removes one).
        listed = banks.responses[0].banks
        assert [b.code for b in listed[:16]] == fs.BANK_CODES
        assert all(b.enabled for b in listed[:16])
        assert not any(b.enabled for b in listed[16:])
        answer = caller.call(
            "QueryCards",
            bank_pb.QueryCardsRequest(
                query_id="after-fuzz", resident_id_number=ZHANG.resident_id_number, name=ZHANG.name
            ),
            bank="ICBC",
            expect={C.OK},
        )
        _check_bank_answer("ICBC", answer.responses)
        # ZHANG's ICBC debit + credit, less those the fuzz closed (frozen ones stay), then the summary.
        cards = fuzz_stack.banks["ICBC"].store.find_cards(ZHANG.resident_id_number, ZHANG.name)
        assert sorted(r.card.card_ref for r in answer.responses[:-1]) == sorted(c.card_ref for c in cards)
        assert len(cards) <= 2
        # Card actions still work end to end: a holder's own report, a fresh request_id.
        holder = world.action_people[-1]
        session = bearer(world.sessions[holder.name])
        report = next(r for r in world.report_cards if world.owner_of[r] == holder.name)
        caller.call(
            "FlagCardNotMine",
            action_pb.FlagCardNotMineRequest(
                request_id="after-" + uuid.uuid4().hex, report=report, card_ref=world.report_cards[report][0]
            ),
            session,
            expect={C.OK},
        )
        mine = caller.call("ListMyAuditEvents", action_pb.ListMyAuditEventsRequest(), session, expect={C.OK})
        assert "card.flag" in {event.action for event in mine.responses[0].events[:3]}

    unhandled = [r for r in fuzz_stack.errors.records if r.name.startswith("server.")]
    assert not unhandled, fuzz_stack.errors.render(unhandled)

    fuzzed = {name: n for name, n in fuzz_stack.counts.items() if name in FUZZ_TESTS}
    total = sum(fuzz_stack.counts.values())
    elapsed = time.monotonic() - world.started
    line = f"fuzz: {total} requests sent in {elapsed:.1f} s ({fuzzed})"
    print(line)
    SUMMARY.append(line)
    if set(fuzzed) == FUZZ_TESTS:  # the whole module ran (not a -k selection)
        assert sum(fuzzed.values()) >= target_total(), line


# -- formerly found defects, now regression tests -------------------------------------------------------


@pytest.mark.parametrize("field_name", ["start_time", "end_time"])
@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(fs.TIMESTAMP_MAX_SECONDS + 1, 0), (fs.TIMESTAMP_MIN_SECONDS - 1, 0), (2**62, 0), (0, 10**9), (0, -1)],
)
def test_out_of_range_timestamps_are_invalid_argument(
    fuzz_stack: FuzzStack, world: World, field_name: str, seconds: int, nanos: int
) -> None:
    request = admin_pb.ListAuditEventsRequest()
    getattr(request, field_name).CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
    with Caller(fuzz_stack, "setup") as caller:
        caller.call("ListAuditEvents", request, bearer(ADMIN_TOKEN), expect={C.INVALID_ARGUMENT})


def test_card_closures_reach_a_final_state(fuzz_stack: FuzzStack, world: World) -> None:
    """Every closure the banks can answer ends final. The call may answer PENDING if the short
    answer_wait runs out first (a loaded machine); then GetCardClosure shows the outcome. How fast
    is a benchmark's business, not a test's, so no clock decides this test."""
    holder = world.action_people[-1]
    session = bearer(world.sessions[holder.name])
    report = next(r for r in world.report_cards if world.owner_of[r] == holder.name)
    with Caller(fuzz_stack, "setup") as caller:
        for ref in world.report_cards[report][:3]:
            request = action_pb.CreateCardClosureRequest(
                request_id="final-" + uuid.uuid4().hex, report=report, card_refs=[ref]
            )
            created = caller.call("CreateCardClosure", request, session, expect={C.OK})
            closure = created.responses[0].closure
            for _ in range(200):
                if action_pb.CARD_CLOSURE_STATE_PENDING not in {item.state for item in closure.items}:
                    break
                time.sleep(0.05)
                fetched = caller.call(
                    "GetCardClosure",
                    action_pb.GetCardClosureRequest(name=closure.name),
                    session,
                    expect={C.OK},
                )
                closure = fetched.responses[0].closure
            assert action_pb.CARD_CLOSURE_STATE_PENDING not in {item.state for item in closure.items}
