"""Fuzzing the privacy promise: nothing a client types is kept, logged or echoed (invariants 1 and 7).

Every string field of every request of the union (identity, lookups, reports, card actions,
admin) is filled with Luhn-valid card numbers under real BINs and GB 11643-valid resident ID
numbers: alone, inside resource names and request ids, around a person's name. The requests go
with a real session (or the admin token), so they reach the domain and the database, not only
the validators. Afterwards the union's raw SQLite files and SMS outbox, every log record and
every answer (messages, error texts, rich error details, trailing metadata) are searched for
each value that was sent, and for anything shaped like a card or ID number.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cardlookup.v1 import card_lookup_service_pb2_grpc as lookup_grpc
from cardlookup.v1 import identity_service_pb2 as identity_pb
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.client import TERMS_VERSION
from server.common.checks import is_luhn_valid, luhn_check_digit
from server.common.logs import record_fields
from server.population.catalogue import BANKS
from server.population.generator import DEMO_PEOPLE
from tests.fuzz import strategies as fs
from tests.fuzz.conftest import ADMIN_TOKEN, FuzzStack, fuzz_scale
from tests.union.test_privacy import secrets_in

CHEN = DEMO_PEOPLE[4].person
SERVICES: list[ServiceDescriptor] = [
    identity_pb.DESCRIPTOR.services_by_name["IdentityService"],
    lookup_pb.DESCRIPTOR.services_by_name["CardLookupService"],
    action_pb.DESCRIPTOR.services_by_name["CardActionService"],
    admin_pb.DESCRIPTOR.services_by_name["AdminService"],
]
METHODS = [(service, method) for service in SERVICES for method in service.methods]
BINS = [b for bank in BANKS for b in (*bank.debit_bins, *bank.credit_bins)]


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    """A Luhn-valid number under a real BIN, of that BIN's length."""
    issuer = draw(st.sampled_from(BINS))
    body = draw(st.text("0123456789", min_size=issuer.length - len(issuer.prefix) - 1, max_size=19))
    partial = (issuer.prefix + body)[: issuer.length - 1]
    return partial + luhn_check_digit(partial)


secret_values = st.one_of(card_numbers(), fs.resident_ids())
CARRIERS = [
    "{}",
    "reports/{}",
    "lookups/{}",
    "closures/{}",
    "banks/{}",
    "{}张伟",
    "张伟 {}",
    "{}-retry",
    " {} ",
    "{}\n",
    "r{}",
]


@st.composite
def carried_secret(draw: st.DrawFn, sent: set[str]) -> str:
    secret = draw(secret_values)
    sent.add(secret)
    return draw(st.sampled_from(CARRIERS)).format(secret)


def _request(draw: st.DrawFn, method: Any, sent: set[str]) -> Message:
    request = GetMessageClass(method.input_type)()
    _fill(draw, request, sent)
    return request


def _fill(draw: st.DrawFn, request: Message, sent: set[str]) -> None:
    """Every string field carries a secret, also inside the contract's own messages (CreateBank's bank)."""
    for field in request.DESCRIPTOR.fields:
        own_message = field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name.startswith(
            ("cardlookup.", "bankquery.")
        )
        if own_message and not field.is_repeated:
            _fill(draw, getattr(request, field.name), sent)
            continue
        if field.type != FieldDescriptor.TYPE_STRING:
            continue
        if field.is_repeated:
            getattr(request, field.name).extend(draw(st.lists(carried_secret(sent), max_size=3)))
        elif field.name == "mobile_number" and draw(st.booleans()):
            setattr(request, field.name, draw(fs.mobiles))  # so the ID number gets past validation
        else:
            setattr(request, field.name, draw(carried_secret(sent)))


@pytest.fixture(scope="module")
def channel(fuzz_stack: FuzzStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_stack.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def log_records() -> Iterator[list[logging.LogRecord]]:
    """Every record the servers log at INFO and above (what a production union writes)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    handler, level = Keep(level=logging.INFO), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(handler)
    root.setLevel(level)


def _call(
    channel: grpc.Channel, service: ServiceDescriptor, method: Any, request: Message, token: str
) -> str:
    """One call; everything the client got back, as text."""
    path = f"/{service.full_name}/{method.name}"
    response_class = GetMessageClass(method.output_type)
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, lambda m: m.SerializeToString(), response_class.FromString)
            call = stream(request, metadata=metadata, timeout=5)
            answers = [MessageToJson(message) for message in call]
            return "\n".join(answers)
        unary = channel.unary_unary(path, lambda m: m.SerializeToString(), response_class.FromString)
        return MessageToJson(unary(request, metadata=metadata, timeout=10))
    except grpc.RpcError as failure:
        error = cast(grpc.Call, failure)  # what the sync stubs raise is both
        status = rpc_status.from_call(error)
        texts = [str(error.code()), str(error.details()), str(error.trailing_metadata())]
        if status is not None:
            texts += [str(status), *(detail.value.decode("utf-8", "replace") for detail in status.details)]
        return "\n".join(texts)


def test_fuzzed_secrets_are_never_kept_logged_or_echoed(
    fuzz_stack: FuzzStack, channel: grpc.Channel, log_records: list[logging.LogRecord]
) -> None:
    session = fuzz_stack.sessions.get(CHEN.name) or fuzz_stack.verify(channel, CHEN)
    sent: set[str] = set()
    answers: list[str] = []
    # A real lookup first, whose request_id is a card number (it fits the pattern), so the fuzz
    # meets a report and the servers have work to log.
    card_like = "6222021234567890128"
    assert is_luhn_valid(card_like)
    sent.add(card_like)
    metadata = (("authorization", f"Bearer {session}"),)
    lookups = lookup_grpc.CardLookupServiceStub(channel)
    created = lookups.CreateLookup(
        lookup_pb.CreateLookupRequest(request_id=card_like, consent_terms_version=TERMS_VERSION),
        metadata=metadata,
        timeout=10,
    )
    progress = list(
        lookups.WatchLookup(
            lookup_pb.WatchLookupRequest(name=created.lookup.name), metadata=metadata, timeout=30
        )
    )
    assert progress[-1].report_ready
    answers += [MessageToJson(created), *(MessageToJson(event) for event in progress)]

    @settings(
        max_examples=max(60, int(600 * fuzz_scale())),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def send(data: st.DataObject) -> None:
        service, method = data.draw(st.sampled_from(METHODS))
        request = _request(data.draw, method, sent)
        token = ADMIN_TOKEN if service.name == "AdminService" else session
        answers.append(_call(channel, service, method, request, token))

    send()
    assert len(sent) > 100
    assert len(answers) >= 60

    union = fuzz_stack.union
    raw = b"".join(path.read_bytes() for path in sorted(union.config.data_dir.glob("union.db*")))
    raw += union.config.sms_sink_path.read_bytes() if union.config.sms_sink_path.exists() else b""
    stored = raw.decode("latin-1")
    logged = "\n".join(str(record_fields(record)) for record in log_records)
    answered = "\n".join(answers)
    forbidden = sorted(sent)
    assert logged, "the servers logged nothing: the log check would prove nothing"
    for where, text in (("database files", stored), ("logs", logged), ("answers", answered)):
        assert secrets_in(text, forbidden) == [], f"a typed card or ID number is in the {where}"
