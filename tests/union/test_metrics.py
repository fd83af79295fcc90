"""Prometheus metrics: what lookups leave on /metrics, bank calls by outcome, and no person in it."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from server.bank.app import RunningBank
from server.bank.faults import FaultSettings
from server.population.generator import cards_of
from tests.conftest import SEED, ZHANG, UnionFactory, run_lookup, verified_client

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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


async def test_no_endpoint_unless_asked(make_union: UnionFactory) -> None:
    union = await make_union()
    assert union.metrics_address is None
