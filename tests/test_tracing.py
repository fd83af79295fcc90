"""Traces: one lookup is one trace across the union and the banks, and no span carries PII.

The union and the banks each get a tracer provider of their own (as separate processes would),
both writing to one in-memory exporter; the W3C trace context travels in gRPC metadata and, for
queries on a shared session stream, in the query itself.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cardlookup.v1 import card_lookup_service_connect as lookup_connect
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cardlookup.v1 import identity_service_connect as identity_connect
from cardlookup.v1 import identity_service_pb2 as identity_pb
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from clients.client import TERMS_VERSION
from server.bank.bank_server import RunningBank, start_all_banks
from server.common import tracing
from server.common.tracing import TracingConfig, otlp_tracer_provider
from server.population.catalogue import BANKS
from server.population.generator import cards_of
from server.union.sms import read_one_time_code
from server.union.union_server import UnionConfig, UnionServer
from tests.conftest import SEED, SIZE, ZHANG, fast_policies, run_lookup, verified_client

CREATE_LOOKUP = "/cardlookup.v1.CardLookupService/CreateLookup"
SESSION_QUERY = "bankquery.v1.BankQueryService/QueryBatchSession query"


def _provider(exporter: InMemorySpanExporter, service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.shutdown()


@pytest.fixture
async def traced(
    exporter: InMemorySpanExporter, seeded_banks_template: Path, tmp_path: Path, database_url: str
) -> AsyncIterator[UnionServer]:
    """16 banks and a union, each traced into `exporter`."""
    async with _traced_union(exporter, seeded_banks_template, tmp_path, database_url) as union:
        yield union


@pytest.fixture
async def traced_http(
    exporter: InMemorySpanExporter, seeded_banks_template: Path, tmp_path: Path, database_url: str
) -> AsyncIterator[UnionServer]:
    """The same, with the union's HTTP port (Connect and gRPC-Web) open."""
    async with _traced_union(
        exporter, seeded_banks_template, tmp_path, database_url, http_listen="127.0.0.1:0", web_root=None
    ) as union:
        yield union


@contextlib.asynccontextmanager
async def _traced_union(
    exporter: InMemorySpanExporter,
    seeded_banks_template: Path,
    tmp_path: Path,
    database_url: str,
    **overrides: Any,
) -> AsyncIterator[UnionServer]:
    shutil.copytree(seeded_banks_template, tmp_path / "banks")
    banks: list[RunningBank] = await start_all_banks(
        data_dir=tmp_path / "banks",
        seed=SEED,
        size=SIZE,
        base_port=0,
        tracer_provider=_provider(exporter, "cardlookup-bank"),
    )
    union = UnionServer(
        UnionConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "union",
            database_url=database_url,
            bank_addresses={bank.bank_code: bank.address for bank in banks},
            population_seed=SEED,
            population_size=SIZE,
            admin_token="test-admin-token",
            tracer_provider=_provider(exporter, "cardlookup-union"),
            **fast_policies(),
            **overrides,
        )
    )
    await union.start()
    try:
        yield union
    finally:
        await union.stop(0)
        for bank in banks:
            await bank.stop(0)


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes[SERVICE_NAME])


def span_tree(spans: Sequence[ReadableSpan]) -> str:
    """One trace as an indented tree, children in the order they started (docs/operations.md shows one)."""
    ids = {span.context.span_id for span in spans}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            took = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
            bank = span.attributes.get("cardlookup.bank") if span.attributes else None
            label = f"{span.name}" + (f" [{bank}]" if bank else "")
            lines.append(f"{'  ' * depth}{label}  ({_service(span)}, {span.kind.name}, {took:.1f} ms)")
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def _statement(span: ReadableSpan) -> str | None:
    attributes = span.attributes or {}
    value = attributes.get("db.statement", attributes.get("db.query.text"))
    return str(value) if value is not None else None


async def _one_lookup(union: UnionServer, exporter: InMemorySpanExporter) -> tuple[str, list[ReadableSpan]]:
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
    lookup_id = str(report.lookup).removeprefix("lookups/")
    return lookup_id, list(exporter.get_finished_spans())


async def test_one_lookup_is_one_trace_with_a_span_per_bank_call_on_both_sides(
    traced: UnionServer, exporter: InMemorySpanExporter
) -> None:
    _, spans = await _one_lookup(traced, exporter)
    [create] = [s for s in spans if s.name == CREATE_LOOKUP and s.kind == SpanKind.SERVER]
    assert _service(create) == "cardlookup-union"
    trace_id = create.context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]

    union_calls = [s for s in in_trace if s.name == SESSION_QUERY and s.kind == SpanKind.CLIENT]
    bank_calls = [s for s in in_trace if s.name == SESSION_QUERY and s.kind == SpanKind.SERVER]
    every_bank = sorted(bank.code for bank in BANKS)
    assert sorted(str((s.attributes or {})["cardlookup.bank"]) for s in union_calls) == every_bank
    assert sorted(str((s.attributes or {})["cardlookup.bank"]) for s in bank_calls) == every_bank
    assert {_service(s) for s in union_calls} == {"cardlookup-union"}
    assert {_service(s) for s in bank_calls} == {"cardlookup-bank"}
    # Each bank's span is the child of the union's call to that bank.
    calls_by_id = {s.context.span_id: s for s in union_calls}
    for served in bank_calls:
        assert served.parent is not None
        caller = calls_by_id[served.parent.span_id]
        assert (caller.attributes or {})["cardlookup.bank"] == (served.attributes or {})["cardlookup.bank"]
        assert caller.parent is not None
        assert caller.parent.span_id == create.context.span_id
    print(f"\none lookup's trace ({len(in_trace)} spans):\n{span_tree(in_trace)}")
    # The lookup's database writes are in the same trace.
    calls = {s.name for s in in_trace if s.name.startswith("db.")}
    assert {"db.create_lookup", "db.record_answer"} <= calls
    # The session streams themselves are not part of any one lookup's trace.
    streams = [s for s in spans if s.name.endswith("/QueryBatchSession")]
    assert all(s.context.trace_id != trace_id for s in streams)


@pytest.mark.parametrize("protocol", [ProtocolType.CONNECT, ProtocolType.GRPC_WEB])
async def test_a_lookup_created_over_http_continues_the_callers_trace(
    traced_http: UnionServer, exporter: InMemorySpanExporter, protocol: ProtocolType
) -> None:
    base = f"http://{traced_http.http_address}"
    async with identity_connect.IdentityServiceClient(base, protocol=protocol) as identity:
        started = await identity.start_verification(
            identity_pb.StartVerificationRequest(
                name=ZHANG.name,
                resident_id_number=ZHANG.resident_id_number,
                mobile_number=ZHANG.mobile_number,
            )
        )
        code = read_one_time_code(traced_http.config.sms_sink_path, ZHANG.mobile_number)
        assert code is not None
        done = await identity.complete_verification(
            identity_pb.CompleteVerificationRequest(verification_id=started.verification_id, code=code)
        )
    # The web page's own span: the caller's trace, which the union's spans must join.
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {
        "authorization": f"Bearer {done.session_token}",
        "traceparent": f"00-{trace_id}-{parent_id}-01",
    }
    async with lookup_connect.CardLookupServiceClient(base, protocol=protocol) as lookups:
        created = await lookups.create_lookup(
            lookup_pb.CreateLookupRequest(request_id="traced-over-http", consent_terms_version=TERMS_VERSION),
            headers=headers,
        )
        events = [
            event
            async for event in lookups.watch_lookup(
                lookup_pb.WatchLookupRequest(name=created.lookup.name), headers=headers
            )
        ]
        assert events[-1].report_ready
        with pytest.raises(ConnectError) as refused:
            await lookups.create_lookup(
                lookup_pb.CreateLookupRequest(request_id="not valid!"), headers=headers
            )
        assert refused.value.code == Code.INVALID_ARGUMENT
    spans = list(exporter.get_finished_spans())
    in_trace = [s for s in spans if s.context.trace_id == int(trace_id, 16)]
    created_spans = [s for s in in_trace if s.name == CREATE_LOOKUP]
    assert [s.kind for s in created_spans] == [SpanKind.SERVER, SpanKind.SERVER]
    create, invalid = sorted(created_spans, key=lambda s: s.start_time or 0)
    for span in (create, invalid):
        assert _service(span) == "cardlookup-union"
        assert span.parent is not None
        assert span.parent.span_id == int(parent_id, 16)
        assert span.parent.is_remote
    attributes = dict(create.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert (attributes["rpc.service"], attributes["rpc.method"]) == (
        "cardlookup.v1.CardLookupService",
        "CreateLookup",
    )
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert (invalid.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The caller's mistake is not the server's fault: no error status, as on a gRPC span.
    assert invalid.status.status_code == StatusCode.UNSET
    [watch] = [s for s in in_trace if s.name == "/cardlookup.v1.CardLookupService/WatchLookup"]
    assert (watch.kind, (watch.attributes or {})["rpc.grpc.status_code"]) == (SpanKind.SERVER, 0)

    # The lookup's database writes nest under the call, and every bank call is in the same trace.
    ids = {s.context.span_id: s for s in in_trace}
    [record] = [s for s in in_trace if s.name == "db.create_lookup"]
    assert record.parent is not None
    assert record.parent.span_id == create.context.span_id
    assert "db.record_answer" in {s.name for s in in_trace}
    union_calls = [s for s in in_trace if s.name == SESSION_QUERY and s.kind == SpanKind.CLIENT]
    bank_calls = [s for s in in_trace if s.name == SESSION_QUERY and s.kind == SpanKind.SERVER]
    every_bank = sorted(bank.code for bank in BANKS)
    assert sorted(str((s.attributes or {})["cardlookup.bank"]) for s in union_calls) == every_bank
    assert sorted(str((s.attributes or {})["cardlookup.bank"]) for s in bank_calls) == every_bank
    assert all(s.parent is not None and s.parent.span_id == create.context.span_id for s in union_calls)
    assert all(s.parent is not None and s.parent.span_id in ids for s in bank_calls)
    print(f"\na lookup's trace over {protocol.name} ({len(in_trace)} spans):\n{span_tree(in_trace)}")

    person = [ZHANG.resident_id_number, ZHANG.name, ZHANG.mobile_number, "not valid!"]
    secrets = person + [card.number for card in cards_of(SEED, ZHANG)]
    texts = [
        str(value) for s in spans for value in [s.name, s.status.description, *(s.attributes or {}).values()]
    ]
    assert not [secret for secret in secrets for text in texts if secret in text]


async def test_a_card_closure_is_a_traced_call_from_the_union_to_the_bank(
    traced: UnionServer, exporter: InMemorySpanExporter
) -> None:
    client = await verified_client(traced, ZHANG)
    async with client:
        _, report = await run_lookup(client)
        card = next(card for card in report.cards if card.bank_code == "CCB")
        await client.close_cards(report.name, [card.card_ref])
    spans = list(exporter.get_finished_spans())
    close_card = "/bankquery.v1.BankQueryService/CloseCard"
    [call] = [s for s in spans if s.name == close_card and s.kind == SpanKind.CLIENT]
    [served] = [s for s in spans if s.name == close_card and s.kind == SpanKind.SERVER]
    assert (_service(call), _service(served)) == ("cardlookup-union", "cardlookup-bank")
    assert served.context.trace_id == call.context.trace_id
    assert served.parent is not None
    assert served.parent.span_id == call.context.span_id
    assert (served.attributes or {})["rpc.grpc.status_code"] == 0


async def test_no_span_attribute_carries_the_persons_details_or_a_bound_sql_value(
    traced: UnionServer, exporter: InMemorySpanExporter
) -> None:
    client = await verified_client(traced, ZHANG)
    async with client:
        _, report = await run_lookup(client)
        await client.close_cards(report.name, [card.card_ref for card in report.cards])
    lookup_id = str(report.lookup).removeprefix("lookups/")
    spans = list(exporter.get_finished_spans())
    assert any(s.name == "/bankquery.v1.BankQueryService/CloseCard" for s in spans)
    person = [ZHANG.resident_id_number, ZHANG.name, ZHANG.mobile_number]
    secrets = person + [card.number for card in cards_of(SEED, ZHANG)]
    assert len(secrets) > len(person)
    found: list[tuple[str, str]] = []
    for span in spans:
        texts: list[Any] = [span.name, span.status.description or ""]
        texts += list((span.attributes or {}).values())
        for event in span.events:
            texts += [event.name, *(event.attributes or {}).values()]
        for link in span.links:
            texts += list((link.attributes or {}).values())
        for text in texts:
            found += [(span.name, secret) for secret in secrets if secret in str(text)]
    assert not found, f"{len(found)} span fields carry a person's details"

    statements = [statement for span in spans if (statement := _statement(span)) is not None]
    # Statements keep their placeholders: no bound value is ever an attribute. The lookup id and
    # the person's keyed hash are bound in statements that are there (the report's cards, the
    # verification), and appear in none.
    bound = [lookup_id, traced.keys.person_hash(ZHANG.resident_id_number)]
    assert lookup_id.startswith("l")
    assert any("found_cards.lookup_id =" in statement for statement in statements)
    assert any(statement.startswith("INSERT INTO verifications") for statement in statements)
    assert not [statement for statement in statements for value in bound if value in statement]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A stand-in OpenTelemetry collector: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_tracing_is_off_without_an_endpoint() -> None:
    assert otlp_tracer_provider(TracingConfig(service_name="cardlookup-union")) is None


async def test_spans_go_to_the_configured_otlp_endpoint(tmp_path: Path, seeded_banks_template: Path) -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    provider = otlp_tracer_provider(
        TracingConfig(otlp_endpoint=f"http://127.0.0.1:{port}", service_name="cardlookup-union")
    )
    assert provider is not None
    union = UnionServer(
        UnionConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "union",
            population_seed=SEED,
            population_size=SIZE,
            admin_token="test-admin-token",
            tracer_provider=provider,
        )
    )
    await union.start()
    try:
        client = await verified_client(union, ZHANG)
        await client.close()
    finally:
        await union.stop(0)
        tracing.shutdown(provider)  # sends what is batched
        server.stop(0)
    spans = [
        (resource.resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    names = {span.name for _, span in spans}
    assert "/cardlookup.v1.IdentityService/CompleteVerification" in names
    services = {
        attribute.value.string_value
        for resource, _ in spans
        for attribute in resource.attributes
        if attribute.key == SERVICE_NAME
    }
    assert services == {"cardlookup-union"}
