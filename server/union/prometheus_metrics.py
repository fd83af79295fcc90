"""Prometheus metrics of one union replica, served over HTTP on `--metrics-listen` (off by default).

What the design's operations section asks for (lookups, reports, each bank's latency and outcome),
plus what an operator watches under load: the calls and lookups in flight and the lookups being
watched. Counters are this replica's own; sum them over replicas in the query. The service-wide
figures (people served, lookups and reports ever, overdue lookups, the fan-out's backlog, deadline
misses) are read from the shared database instead, so every replica shows the same: take `max`.
Every RPC's count and duration by method and status code: server/common/rpc_metrics.py.

Each UnionServer has a registry of its own (with the process and garbage-collector metrics, see
server/common/prometheus.py), so several in one process (the tests) do not collide.
Labels are bank codes and fixed outcome names only: nothing about a person reaches a metric, so the
endpoint needs no credential, but bind it to loopback or the monitoring network only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.common.prometheus import process_registry
from server.union.domain.metrics import BankCallOutcome
from server.union.storage.database import MonitoringTotals

log = logging.getLogger(__name__)

# Seconds. A bank answers in milliseconds when healthy; the call deadline defaults to 10 s.
BANK_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds from a lookup's creation to its report: ~0.1 s when every bank answers at once, up to the
# 24-hour deadline when one stays silent.
TIME_TO_REPORT_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
    21600.0,
    86400.0,
)
# Lookups whose creation time is kept for the histogram above. One whose report another replica
# writes is never taken out, so the oldest go first past this many.
MAX_TIMED_LOOKUPS = 50_000
# The database-wide figures are read at most this often (seconds), however many Prometheus servers
# scrape, and a scrape waits at most DATABASE_READ_TIMEOUT for them (then goes without them).
DATABASE_READ_INTERVAL = 10.0
DATABASE_READ_TIMEOUT = 5.0


class PrometheusMetrics:
    """`server.union.domain.metrics.Metrics`, kept in a Prometheus registry of its own."""

    def __init__(self) -> None:
        self.registry = process_registry()
        self._lookups = Counter(
            "cardlookup_lookups_created", "Lookups this replica created.", registry=self.registry
        )
        self._reports = Counter(
            "cardlookup_reports_generated",
            "Reports this replica wrote (one per lookup, by whichever replica finished it).",
            registry=self.registry,
        )
        self._calls = Counter(
            "cardlookup_bank_calls",
            "Calls to banks by how they ended: answered; retried (a failure the bank is asked again "
            "after); failed (for good: the report says why).",
            ["bank", "outcome"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "cardlookup_bank_call_seconds",
            "Duration of one call to a bank, however it ended.",
            ["bank"],
            buckets=BANK_CALL_BUCKETS,
            registry=self.registry,
        )
        self._time_to_report = Histogram(
            "cardlookup_time_to_report_seconds",
            "From a lookup's creation to its report being written, for lookups this replica both "
            "created and finished.",
            buckets=TIME_TO_REPORT_BUCKETS,
            registry=self.registry,
        )
        self._created: dict[str, float] = {}  # lookup id → time.monotonic() at creation
        self._up = Gauge(
            "cardlookup_bank_up",
            "1 while the bank's health check answers SERVING to this replica, else 0 (checked every "
            "health interval, 2 s by default).",
            ["bank"],
            registry=self.registry,
        )
        # labels() takes a lock and builds a key on every call; the children are few and fixed.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def lookup_created(self, lookup_id: str) -> None:
        self._lookups.inc()
        self._created[lookup_id] = time.monotonic()
        if len(self._created) > MAX_TIMED_LOOKUPS:
            del self._created[next(iter(self._created))]  # the oldest (dicts keep insertion order)

    def report_generated(self, lookup_id: str) -> None:
        self._reports.inc()
        created = self._created.pop(lookup_id, None)
        if created is not None:
            self._time_to_report.observe(time.monotonic() - created)

    def bank_call(self, bank_code: str, outcome: BankCallOutcome, seconds: float) -> None:
        children = self._children.get((bank_code, outcome))
        if children is None:
            children = (self._calls.labels(bank_code, outcome), self._seconds.labels(bank_code))
            self._children[(bank_code, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)

    def bank_reachable(self, bank_code: str, up: bool) -> None:
        self._up.labels(bank_code).set(1 if up else 0)

    def watch_live_state(
        self,
        bank_calls: Callable[[], Mapping[str, int]],
        lookups_in_flight: Callable[[], int],
        watched_lookups: Callable[[], int],
    ) -> None:
        """Gauges read from the running union at each scrape (so they cost nothing in between).
        The callables run on the HTTP server's thread: each must read its state in one step."""
        self.registry.register(_LiveState(bank_calls, lookups_in_flight, watched_lookups))

    def watch_database(
        self,
        read: Callable[[], Coroutine[Any, Any, MonitoringTotals]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Figures read from the shared database at scrape time (the statistics the service reports,
        the fan-out's backlog, overdue lookups): every replica shows the same, so take `max`, never
        `sum`, over replicas. `read` runs on `loop`, the union's own."""
        self.registry.register(_DatabaseTotals(read, loop))


class _LiveState(Collector):
    def __init__(
        self,
        bank_calls: Callable[[], Mapping[str, int]],
        lookups_in_flight: Callable[[], int],
        watched_lookups: Callable[[], int],
    ) -> None:
        self._bank_calls = bank_calls
        self._lookups_in_flight = lookups_in_flight
        self._watched_lookups = watched_lookups

    def collect(self) -> Iterator[Metric]:
        calls = GaugeMetricFamily(
            "cardlookup_bank_calls_in_flight", "Calls to each bank in flight now.", labels=["bank"]
        )
        for bank_code, count in sorted(self._bank_calls().items()):
            calls.add_metric([bank_code], count)
        yield calls
        yield GaugeMetricFamily(
            "cardlookup_lookups_in_flight",
            "Lookups with bank calls in flight on this replica now.",
            value=self._lookups_in_flight(),
        )
        yield GaugeMetricFamily(
            "cardlookup_watched_lookups",
            "Lookups (and card actions) somebody is waiting on through this replica now.",
            value=self._watched_lookups(),
        )


class _DatabaseTotals(Collector):
    def __init__(
        self, read: Callable[[], Coroutine[Any, Any, MonitoringTotals]], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._read = read
        self._loop = loop
        self._lock = threading.Lock()  # scrapes may come from several threads at once
        self._last: tuple[float, MonitoringTotals] | None = None

    def _totals(self) -> MonitoringTotals | None:
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < DATABASE_READ_INTERVAL:
                return self._last[1]
            try:
                future = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
            except RuntimeError:  # the union's loop is closed: it is shutting down
                return None
            try:
                totals = future.result(timeout=DATABASE_READ_TIMEOUT)
            except Exception as error:  # the page goes without them; health reports the database
                future.cancel()
                log.warning(
                    "database figures for /metrics unavailable", extra={"error": type(error).__name__}
                )
                return None
            self._last = (time.monotonic(), totals)
            return totals

    def collect(self) -> Iterator[Metric]:
        totals = self._totals()
        if totals is None:
            return
        yield GaugeMetricFamily(
            "cardlookup_service_people_verified",
            "People who have completed real-name verification (the people the service has served), "
            "from the database: the same on every replica.",
            value=totals.people_verified,
        )
        yield CounterMetricFamily(
            "cardlookup_service_lookups_created",
            "Lookups created by every replica together, from the database.",
            value=totals.lookups_created,
        )
        yield CounterMetricFamily(
            "cardlookup_service_reports_generated",
            "Reports generated by every replica together, from the database.",
            value=totals.reports_generated,
        )
        yield GaugeMetricFamily(
            "cardlookup_lookups_overdue",
            "Lookups still running past their deadline (24 hours by default): each should have been "
            "finalised with its silent banks marked, so anything above 0 is a missed deadline.",
            value=totals.lookups_overdue,
        )
        waiting = GaugeMetricFamily(
            "cardlookup_bank_tasks_waiting",
            "Calls to each bank that are due and that no replica has claimed yet (the fan-out's "
            "queue), from the database.",
            labels=["bank"],
        )
        for bank_code, count in sorted(totals.bank_tasks_waiting.items()):
            waiting.add_metric([bank_code], count)
        yield waiting
        missed = GaugeMetricFamily(
            "cardlookup_bank_deadline_misses_last_hour",
            "Lookups finalised at their deadline in the last hour without this bank's answer (the "
            "report marks it no-response), from the database.",
            labels=["bank"],
        )
        for bank_code, count in sorted(totals.bank_deadline_misses.items()):
            missed.add_metric([bank_code], count)
        yield missed
