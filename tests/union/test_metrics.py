"""Prometheus metrics (what lookups leave on /metrics, bank calls by outcome, every RPC by method and
status code, the process and GC collectors, the database-wide figures every replica agrees on, no
person in it) and each bank's health entry on the union."""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cardlookup.v1 import card_lookup_service_pb2_grpc as lookup_grpc
from cardlookup.v1 import identity_service_pb2 as identity_pb
from cardlookup.v1 import identity_service_pb2_grpc as identity_grpc
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from clients.client import TERMS_VERSION
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import cards_of
from server.union import prometheus_metrics
from server.union.__main__ import app as union_app
from tests.conftest import SEED, ZHANG, UnionFactory, health_status, run_lookup, verified_client, wait_health

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _scrape(address: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            assert response.status == 200
            return bytes(response.read()).decode()

    return await asyncio.to_thread(get)


def _samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _calls(samples: Samples, bank: str, outcome: str) -> float:
    return samples.get(("cardlookup_bank_calls_total", (("bank", bank), ("outcome", outcome))), 0.0)


async def test_a_lookup_is_counted_per_bank_and_nothing_about_the_person_is_exposed(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    union = await make_union(metrics_listen="127.0.0.1:0")
    assert union.metrics_address is not None
    client = await verified_client(union, ZHANG)
    async with client:
        await run_lookup(client)
    text = await _scrape(union.metrics_address)
    samples = _samples(text)
    assert samples[("cardlookup_lookups_created_total", ())] == 1
    assert samples[("cardlookup_reports_generated_total", ())] == 1
    assert samples[("cardlookup_time_to_report_seconds_count", ())] == 1
    assert 0 < samples[("cardlookup_time_to_report_seconds_sum", ())] < 60
    for code in banks:
        assert _calls(samples, code, "answered") == 1
        assert _calls(samples, code, "retried") == _calls(samples, code, "failed") == 0
        assert samples[("cardlookup_bank_call_seconds_count", (("bank", code),))] == 1
        assert samples[("cardlookup_bank_calls_in_flight", (("bank", code),))] == 0
    assert samples[("cardlookup_lookups_in_flight", ())] == 0
    assert ("cardlookup_watched_lookups", ()) in samples
    person = [ZHANG.resident_id_number, ZHANG.name, ZHANG.mobile_number]
    assert not [value for value in person + [card.number for card in cards_of(SEED, ZHANG)] if value in text]


async def test_failed_calls_are_counted_by_outcome(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(error_rate=1.0)  # UNAVAILABLE: asked again
    banks["CMB"].servicer.faults = FaultSettings(lie="wrong_bank")  # a failure for good
    union = await make_union(metrics_listen="127.0.0.1:0")
    assert union.metrics_address is not None
    client = await verified_client(union, ZHANG)
    async with client:
        lookup = await client.create_lookup(
            request_id="metrics-outcomes", consent_terms_version=TERMS_VERSION
        )
        for _ in range(100):
            samples = _samples(await _scrape(union.metrics_address))
            if _calls(samples, "ICBC", "retried") >= 2:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("ICBC's failures were never counted")
        banks["ICBC"].servicer.faults = FaultSettings()  # it recovers; the next attempt answers
        events = [event async for event in client.watch_lookup(lookup.name, stream_timeout=60)]
    assert events[-1].report_ready
    samples = _samples(await _scrape(union.metrics_address))
    retried = _calls(samples, "ICBC", "retried")
    assert retried >= 2
    assert _calls(samples, "ICBC", "answered") == 1
    assert samples[("cardlookup_bank_call_seconds_count", (("bank", "ICBC"),))] == retried + 1
    assert _calls(samples, "CMB", "failed") == 1
    assert _calls(samples, "CMB", "answered") == _calls(samples, "CMB", "retried") == 0
    assert samples[("cardlookup_reports_generated_total", ())] == 1


def test_time_to_report_forgets_the_oldest_lookups_past_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus_metrics, "MAX_TIMED_LOOKUPS", 2)
    recorder = prometheus_metrics.PrometheusMetrics()
    for lookup_id in ("l1", "l2", "l3"):  # l1's report will be written by another replica, say
        recorder.lookup_created(lookup_id)
    for lookup_id in ("l1", "l2", "l3"):
        recorder.report_generated(lookup_id)
    assert recorder.registry.get_sample_value("cardlookup_reports_generated_total") == 3
    assert recorder.registry.get_sample_value("cardlookup_time_to_report_seconds_count") == 2


async def test_no_endpoint_unless_asked(make_union: UnionFactory) -> None:
    union = await make_union()
    assert union.metrics_address is None


async def test_each_bank_has_a_health_entry_and_an_up_gauge(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    union = await make_union(health_interval=timedelta(milliseconds=100), metrics_listen="127.0.0.1:0")
    assert union.metrics_address is not None
    for code in banks:
        await wait_health(union.address, SERVING, f"bank/{code}")
    await banks["CMB"].server.set_serving(False)  # draining
    await banks["CZB"].server.stop(0)  # gone
    await wait_health(union.address, NOT_SERVING, "bank/CMB")
    await wait_health(union.address, NOT_SERVING, "bank/CZB")
    assert await health_status(union.address) == SERVING  # partial reports, not an unavailable union
    assert await health_status(union.address, "bank/ICBC") == SERVING
    samples = _samples(await _scrape(union.metrics_address))
    up = {code: samples[("cardlookup_bank_up", (("bank", code),))] for code in banks}
    assert up == {code: 0.0 if code in ("CMB", "CZB") else 1.0 for code in banks}
    await banks["CMB"].server.set_serving(True)
    await wait_health(union.address, SERVING, "bank/CMB")


def test_the_cli_refuses_a_metrics_address_without_a_port(tmp_path: Path) -> None:
    for wrong in ("abc", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000"):
        arguments = ["serve", "--data-dir", str(tmp_path), "--metrics-listen", wrong]
        result = CliRunner().invoke(union_app, arguments)
        assert result.exit_code == 2, wrong
        assert "--metrics-listen" in result.output


def _rpcs(samples: Samples, service: str, method: str, code: str, server: str = "union") -> float:
    labels = (("grpc_code", code), ("grpc_method", method), ("grpc_service", service), ("server", server))
    return samples.get(("cardlookup_rpc_duration_seconds_count", labels), 0.0)


async def _refused(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value.code()


async def test_every_rpc_is_counted_by_method_and_status_code(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    union = await make_union(metrics_listen="127.0.0.1:0")
    assert union.metrics_address is not None
    client = await verified_client(union, ZHANG)
    async with client:
        await run_lookup(client)
    async with grpc.aio.insecure_channel(union.address) as channel:
        identity = identity_grpc.IdentityServiceStub(channel)
        lookups = lookup_grpc.CardLookupServiceStub(channel)
        bad_input = identity.StartVerification(identity_pb.StartVerificationRequest(name="张伟"))
        assert await _refused(bad_input) == grpc.StatusCode.INVALID_ARGUMENT
        no_session = lookups.CreateLookup(
            lookup_pb.CreateLookupRequest(request_id="no-session", consent_terms_version=TERMS_VERSION)
        )
        assert await _refused(no_session) == grpc.StatusCode.UNAUTHENTICATED
        # Bytes that are no protobuf message: refused by the request guard, after the observer.
        garbage = channel.unary_unary("/cardlookup.v1.IdentityService/StartVerification")(b"\xff\xff\xff")
        assert await _refused(garbage) == grpc.StatusCode.INVALID_ARGUMENT
        unknown = channel.unary_unary("/no.such.v1.Service/Secret6222021234567890123")(b"")
        assert await _refused(unknown) == grpc.StatusCode.UNIMPLEMENTED
    text = await _scrape(union.metrics_address)
    samples = _samples(text)
    identity_service, lookup_service = "cardlookup.v1.IdentityService", "cardlookup.v1.CardLookupService"
    assert _rpcs(samples, identity_service, "StartVerification", "OK") == 1
    assert _rpcs(samples, identity_service, "CompleteVerification", "OK") == 1
    assert _rpcs(samples, identity_service, "StartVerification", "INVALID_ARGUMENT") == 2
    assert _rpcs(samples, lookup_service, "CreateLookup", "OK") == 1
    assert _rpcs(samples, lookup_service, "CreateLookup", "UNAUTHENTICATED") == 1
    assert _rpcs(samples, lookup_service, "WatchLookup", "OK") == 1
    assert _rpcs(samples, lookup_service, "GetReport", "OK") == 1
    assert _rpcs(samples, "unregistered", "unregistered", "UNIMPLEMENTED") == 1
    latency = (
        "cardlookup_rpc_duration_seconds_sum",
        (
            ("grpc_code", "OK"),
            ("grpc_method", "CreateLookup"),
            ("grpc_service", lookup_service),
            ("server", "union"),
        ),
    )
    assert samples[latency] > 0
    assert "Secret" not in text
    assert "no.such" not in text
    # The process and garbage-collector collectors are in the union's registry.
    assert samples[("process_cpu_seconds_total", ())] > 0
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert ("python_gc_collections_total", (("generation", "0"),)) in samples


async def test_replicas_agree_on_the_service_figures_from_the_database(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    first = await make_union(metrics_listen="127.0.0.1:0")
    second = await make_union(metrics_listen="127.0.0.1:0")
    assert first.metrics_address is not None
    assert second.metrics_address is not None
    client = await verified_client(first, ZHANG)
    async with client:
        await run_lookup(client)
    on_first = _samples(await _scrape(first.metrics_address))
    on_second = _samples(await _scrape(second.metrics_address))
    for samples in (on_first, on_second):
        assert samples[("cardlookup_service_people_verified", ())] == 1
        assert samples[("cardlookup_service_lookups_created_total", ())] == 1
        assert samples[("cardlookup_service_reports_generated_total", ())] == 1
        assert samples[("cardlookup_lookups_overdue", ())] == 0
        assert not [
            key for key, value in samples.items() if key[0] == "cardlookup_bank_tasks_waiting" and value
        ]
    # The per-replica counters differ: only one of them created the lookup.
    assert on_first[("cardlookup_lookups_created_total", ())] == 1
    assert on_second.get(("cardlookup_lookups_created_total", ()), 0.0) == 0
    stats = await second.admin.stats()  # what GetServiceStats answers, on the other replica
    assert (stats.people_verified, stats.lookups_created, stats.reports_generated) == (1, 1, 1)


async def test_an_overdue_lookup_and_the_fan_out_backlog_are_read_from_the_database(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    for running in banks.values():
        running.servicer.faults = FaultSettings(outage=True)
    union = await make_union()
    client = await verified_client(union, ZHANG)
    async with client:
        await client.create_lookup(request_id="overdue", consent_terms_version=TERMS_VERSION)
    # Read as if a day had passed and no replica had run since: every bank call is due and unclaimed,
    # and the lookup is past its deadline.
    later = union.clock.now() + timedelta(days=1)
    await union.orchestrator.stop(0)
    totals = await union.store.monitoring_totals(later)
    assert totals.lookups_overdue == 1
    assert totals.bank_tasks_waiting == {code: 1 for code in banks}
    assert (totals.lookups_created, totals.reports_generated) == (1, 0)
    assert totals.bank_deadline_misses == {}
    # A replica comes back and finalises it: every silent bank missed the deadline, and the lookup
    # is no longer overdue.
    lookup_id = (await union.store.lookups_past_deadline(later, limit=10))[0]
    await union.orchestrator._finalize(lookup_id, force=True)
    totals = await union.store.monitoring_totals(union.clock.now())
    assert totals.lookups_overdue == 0
    assert totals.bank_tasks_waiting == {}
    assert totals.bank_deadline_misses == {code: 1 for code in banks}
    assert totals.reports_generated == 1


async def _read_to_the_end(stream: Any) -> None:
    async for _ in stream:
        pass


async def test_streams_the_caller_gives_up_on_are_counted_cancelled_or_past_their_deadline(
    make_union: UnionFactory, banks: dict[str, RunningBank]
) -> None:
    banks["ICBC"].servicer.faults = FaultSettings(outage=True)  # the lookup stays in flight
    union = await make_union(metrics_listen="127.0.0.1:0")
    assert union.metrics_address is not None
    client = await verified_client(union, ZHANG)
    async with client:
        lookup = await client.create_lookup(request_id="watch-and-leave", consent_terms_version=TERMS_VERSION)
        metadata = (("authorization", f"Bearer {client.session_token}"),)
        async with grpc.aio.insecure_channel(union.address) as channel:
            stub = lookup_grpc.CardLookupServiceStub(channel)
            request = lookup_pb.WatchLookupRequest(name=lookup.name)
            watch = stub.WatchLookup(request, metadata=metadata)
            await watch.read()
            watch.cancel()  # the caller leaves: the server's handler is cancelled mid-stream
            late = stub.WatchLookup(request, metadata=metadata, timeout=0.5)
            assert await _refused(_read_to_the_end(late)) == grpc.StatusCode.DEADLINE_EXCEEDED
    service = "cardlookup.v1.CardLookupService"
    for _ in range(100):
        samples = _samples(await _scrape(union.metrics_address))
        if _rpcs(samples, service, "WatchLookup", "CANCELLED") and _rpcs(
            samples, service, "WatchLookup", "DEADLINE_EXCEEDED"
        ):
            break
        await asyncio.sleep(0.1)
    assert _rpcs(samples, service, "WatchLookup", "CANCELLED") == 1
    assert _rpcs(samples, service, "WatchLookup", "DEADLINE_EXCEEDED") == 1
    assert _rpcs(samples, service, "WatchLookup", "OK") == 0
