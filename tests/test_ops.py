"""What ships for operators in ops/: Prometheus alert rules that promtool accepts and that fire when they
should, an example scrape configuration, and a Grafana dashboard; both ask only for metrics the union
and the banks really export."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from bankquery.v1 import bank_query_service_pb2 as bank_pb
from bankquery.v1 import bank_query_service_pb2_grpc as bank_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.bank.bank_server import RunningBank, start_bank
from server.common.prometheus import process_registry
from server.common.rpc_metrics import RpcMetrics
from tests.conftest import SEED, SIZE, ZHANG, UnionFactory, run_lookup, verified_client

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "ops" / "prometheus"
DASHBOARD = ROOT / "ops" / "grafana" / "cardlookup.json"

# PromQL's own words: functions, aggregations, keywords. Anything else that is a bare identifier outside
# label matchers and grouping clauses is a metric name.
PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "irate",
    "increase",
    "delta",
    "deriv",
    "histogram_quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.geteuid() == 0:
            pytest.fail("promtool is missing: `make promtool` installs it (Debian's prometheus package)")
        pytest.skip("promtool is missing and this is not root (make promtool installs it as root)")
    return found


def _run(*arguments: str) -> str:
    result = subprocess.run(
        arguments, capture_output=True, text=True, cwd=PROMETHEUS, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_alert_rules_and_the_scrape_configuration_pass_promtool() -> None:
    promtool = _promtool()
    assert "SUCCESS: 8 rules found" in _run(promtool, "check", "rules", "alerts.yml")
    assert "is valid prometheus config file syntax" in _run(promtool, "check", "config", "prometheus.yml")


def test_each_alert_fires_on_what_it_watches_and_not_on_healthy_series() -> None:
    promtool = _promtool()
    assert "SUCCESS" in _run(promtool, "test", "rules", "alerts_test.yml")
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    defined = set(re.findall(r"- alert: (\w+)", (PROMETHEUS / "alerts.yml").read_text()))
    assert tested == defined
    assert {"CardLookupBankDown", "CardLookupLookupsOverdue", "CardLookupRpcErrorRatio"} <= defined
    assert "CardLookupFanOutBacklog" in defined  # the queue depth


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", expression)  # strings (inside label matchers, mostly)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", stripped))
    return words - PROMQL_WORDS


def test_metric_names_are_found_in_expressions() -> None:
    expression = (
        'sum by (server) (rate(cardlookup_rpc_duration_seconds_count{grpc_code=~"UNKNOWN|INTERNAL"}[5m]))'
        " / on (server) histogram_quantile(0.99, sum by (le) (rate(process_cpu_seconds_total[5m]))) > 0.05"
    )
    assert metric_names(expression) == {"cardlookup_rpc_duration_seconds_count", "process_cpu_seconds_total"}


def _exported(page: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(page):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
    return names


async def _bank_page(tmp_path: Path, seeded: Path) -> str:
    """The metrics page of a bank process, after it has answered a query."""
    shutil.copytree(seeded, tmp_path / "one-bank")
    registry = process_registry()
    bank: RunningBank = await start_bank(
        "ICBC", data_dir=tmp_path / "one-bank", seed=SEED, size=SIZE, rpc_metrics=RpcMetrics(registry)
    )
    try:
        async with grpc.aio.insecure_channel(bank.address) as channel:
            request = bank_pb.QueryCardsRequest(
                query_id="q", resident_id_number=ZHANG.resident_id_number, name=ZHANG.name
            )
            assert [m async for m in bank_grpc.BankQueryServiceStub(channel).QueryCards(request)]
    finally:
        await bank.stop(0)
    return generate_latest(registry).decode()


async def _union_page(union_address: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://{union_address}/metrics", timeout=5) as response:
            return bytes(response.read()).decode()

    return await asyncio.to_thread(get)


def _expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for value in node.values() for e in _expressions(value)]
    if isinstance(node, list):
        return [e for value in node for e in _expressions(value)]
    return []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_dashboard_and_the_alerts_ask_only_for_metrics_the_servers_export(
    make_union: UnionFactory,
    banks: dict[str, RunningBank],
    tmp_path: Path,
    seeded_banks_template: Path,
) -> None:
    union = await make_union(metrics_listen="127.0.0.1:0")
    assert union.metrics_address is not None
    client = await verified_client(union, ZHANG)
    async with client:
        await run_lookup(client)
    exported = _exported(await _union_page(union.metrics_address))
    exported |= _exported(await _bank_page(tmp_path, seeded_banks_template))

    dashboard = json.loads(DASHBOARD.read_text())
    panel_expressions = _expressions(dashboard["panels"])
    assert len(panel_expressions) >= 20
    asked = {name for expression in panel_expressions for name in metric_names(expression)}
    assert asked <= exported, asked - exported
    # Both sides of the stack are on it: the service, the banks, every RPC, the processes.
    assert {
        "cardlookup_service_people_verified",
        "cardlookup_service_reports_generated_total",
        "cardlookup_bank_up",
        "cardlookup_rpc_duration_seconds_count",
        "process_cpu_seconds_total",
        "python_gc_collections_total",
    } <= asked
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]

    rules = re.findall(r"expr: (\|\n(?:\s{10}.*\n)+|.*)", (PROMETHEUS / "alerts.yml").read_text())
    assert len(rules) == 8
    # `up` is Prometheus's own: one per scraped target.
    alerted = {name for rule in rules for name in metric_names(rule.lstrip("|"))} - {"up"}
    assert alerted <= exported, alerted - exported
