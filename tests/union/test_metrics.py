"""Prometheus metrics (what lookups leave on /metrics, bank calls by outcome, no person in it) and
each bank's health entry on the union."""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from server.bank.app import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import cards_of
from server.union import prometheus_metrics
from server.union.main import app as union_app
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
        lookup = await client.create_lookup(request_id="metrics-outcomes")
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
