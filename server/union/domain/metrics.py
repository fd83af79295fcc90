"""What the domain reports for monitoring, and to whom: a small interface the lookup code calls.

The Prometheus implementation lives outside the domain (`server/union/prometheus_metrics.py`); tests
and tools that do not care get `NoMetrics`. Every argument is a bank code, a fixed outcome name or a duration:
nothing about a person is ever handed to it.
"""

from __future__ import annotations

from typing import Literal, Protocol

# How one call to a bank ended: the bank answered; it failed and will be asked again; it failed for
# good (the bank's outcome in the report says why).
BankCallOutcome = Literal["answered", "retried", "failed"]


class Metrics(Protocol):
    def lookup_created(self, lookup_id: str) -> None: ...

    def report_generated(self, lookup_id: str) -> None: ...

    def bank_call(self, bank_code: str, outcome: BankCallOutcome, seconds: float) -> None: ...


class NoMetrics:
    """Metrics that go nowhere."""

    def lookup_created(self, lookup_id: str) -> None:
        pass

    def report_generated(self, lookup_id: str) -> None:
        pass

    def bank_call(self, bank_code: str, outcome: BankCallOutcome, seconds: float) -> None:
        pass
