"""The union's storage: every aggregate's port on one database, chosen from its URL.

`open_store(url)` is the single place that picks a backend: SQLite (the embedded
default) or PostgreSQL (production, several replicas on one database). `Store` is
the composition of the aggregates' storage modules over one `Runner`, which owns
everything that differs between the two backends; the domain sees it only through
the ports of server.union.domain.ports, wired in server.union.union_server.

| aggregate | module | tables |
|---|---|---|
| catalogue | catalogue_store | banks, regions |
| identities and verifications | identity_store | identities, verifications, verified_people |
| lookups and bank tasks | lookup_store, answer_store | lookups, bank_tasks |
| reports | report_store | reports, found_cards |
| card actions | card_action_store | card_closures, card_actions |
| audit trail | audit_store | audit_events |
| report-ready outbox | outbox_store | notifications |
| quotas | quota_store | quota_slots |
| statistics | stats_store | counters |
| sessions, admin credentials | credentials | sessions, admin_credentials |
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from server.union.domain.ports import DuplicateRequest, RequestMismatch, StoreUnavailable
from server.union.storage.answer_store import SqlAnswers
from server.union.storage.audit_store import SqlAudit
from server.union.storage.card_action_store import SqlCardActions
from server.union.storage.catalogue_store import SqlCatalogue
from server.union.storage.identity_store import SqlIdentities
from server.union.storage.lookup_store import SqlLookups
from server.union.storage.outbox_store import SqlNotifications
from server.union.storage.quota_store import SqlQuotas
from server.union.storage.report_store import SqlReports
from server.union.storage.runner import Runner, alembic_config
from server.union.storage.stats_store import MonitoringTotals, SqlStats

__all__ = [
    "DuplicateRequest",
    "MonitoringTotals",
    "RequestMismatch",
    "Store",
    "StoreUnavailable",
    "alembic_config",
    "open_store",
]


class Store(
    SqlCatalogue,
    SqlIdentities,
    SqlLookups,
    SqlAnswers,
    SqlReports,
    SqlCardActions,
    SqlAudit,
    SqlNotifications,
    SqlQuotas,
    SqlStats,
):
    """Durable state of the union: every storage port, on the database at `url`."""

    def __init__(self, url: str) -> None:
        # Each aggregate with state of its own initialises it, cooperatively, along the MRO.
        super().__init__(Runner(url))
        self.url = url

    @property
    def engine(self) -> Engine:
        return self.runner.engine

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        self.runner.migrate()

    async def ping(self) -> bool:
        return await self.runner.ping()

    async def close(self) -> None:
        await self.runner.close()


def open_store(url: str) -> Store:
    """The one place a backend is chosen: sqlite:/// (embedded) or postgresql+psycopg:// (production)."""
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"unsupported database backend {backend!r}: use sqlite:/// or postgresql+psycopg://")
    return Store(url)
