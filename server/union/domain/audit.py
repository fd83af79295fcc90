"""The audit trail: who did what, when, and how it ended — never a name, ID or card number.

Actors are the keyed person hash (the same pseudonym the union uses
everywhere) or "admin"; resources are resource names like "reports/r…" that the
audited block set only after it validated them. Nothing a client typed is kept
as typed: a resource that is not a validated name is recorded as INVALID_RESOURCE.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from server.common import errors
from server.union.clock import Clock
from server.union.domain import model
from server.union.domain.paging import Pager
from server.union.domain.ports import AuditStore
from server.union.keyring import Keys

ADMIN_ACTOR = "admin"
# What is recorded in place of a resource name that is not one of ours (never the text itself).
INVALID_RESOURCE = "(invalid)"
# Every resource name the union itself makes, each with its id's exact shape (so a card number
# cannot pass for an id): lookups, reports, closures, card actions, admin credentials, banks,
# regions, the terms a person accepted, and a person (their keyed hash) whose trail was read.
RESOURCE_NAME = re.compile(
    r"^(?:lookups/l[0-9a-f]{24}|reports/r[0-9a-f]{24}|closures/k[0-9a-f]{24}|cardActions/a[0-9a-f]{24}"
    r"|adminCredentials/c[0-9a-f]{16}|banks/[A-Z]{2,16}|regions/[0-9]{6}|terms/[0-9]{4}-[0-9]{2}"
    r"|people/[0-9a-f]{64})$"
)
# A person as an actor: their keyed hash.
PERSON_ACTOR = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass
class Outcome:
    """Set by the audited block when "ok" is not the whole story (e.g. the bank's decision)."""

    value: str = "ok"
    resource: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # Set when the block wrote its "ok" event itself, in the transaction of what it did.
    recorded: bool = False


def safe_resource(resource: str) -> str:
    """The resource as recorded: a validated resource name, nothing, or the INVALID_RESOURCE marker."""
    if not resource or RESOURCE_NAME.fullmatch(resource):
        return resource
    return INVALID_RESOURCE


def refusal(error: errors.DomainError) -> str:
    reason = getattr(error, "reason", "") or type(error).__name__.upper()
    return f"refused:{reason}"


class AuditTrail:
    def __init__(self, store: AuditStore, clock: Clock, keys: Keys) -> None:
        self._store = store
        self._clock = clock
        self._pager = Pager(keys, "audit", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

    async def record(self, actor: str, action: str, outcome: str, resource: str = "") -> None:
        await self._store.add_audit_event(self._clock.now(), actor, action, outcome, safe_resource(resource))

    @contextlib.asynccontextmanager
    async def action(self, actor: str, action: str) -> AsyncIterator[Outcome]:
        """Record `action` with the block's outcome: "ok", what the block set, or the refusal. The
        block sets `resource` once it has validated it, so a refused request records none."""
        outcome = Outcome()
        try:
            yield outcome
        except errors.DomainError as error:
            if not isinstance(error, errors.Unavailable):  # nothing can be written while the database is down
                await self.record(actor, action, refusal(error), outcome.resource)
            raise
        if not outcome.recorded:
            await self.record(actor, action, outcome.value, outcome.resource)

    def entry(self, actor: str, action: str, resource: str) -> model.AuditEntry:
        """An "ok" event for a store call to write in its own transaction (see Outcome.recorded)."""
        return model.AuditEntry(self._clock.now(), actor, action, "ok", safe_resource(resource))

    async def read(
        self,
        reader: str,
        actor: str | None,
        start: datetime | None,
        end: datetime | None,
        page_size: int,
        page_token: str,
        *,
        operator: bool,
    ) -> tuple[list[model.AuditEvent], str]:
        """`list`, itself audited: a trail is data about people. A person reading their own is
        "audit.read"; an operator's read (ListAuditEvents, whoever's trail) is "admin.audit.read",
        naming the person read (by keyed hash) when the read was of one person. The event is
        written after the page is read, so a read never shows itself."""
        async with self.action(reader, "admin.audit.read" if operator else "audit.read") as audited:
            page = await self.list(actor, start, end, page_size, page_token)
            if operator and actor is not None and PERSON_ACTOR.fullmatch(actor):
                audited.resource = f"people/{actor}"
        return page

    async def list(
        self,
        actor: str | None,
        start: datetime | None,
        end: datetime | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[model.AuditEvent], str]:
        if start is not None and end is not None and start > end:
            raise errors.InvalidArgument([errors.FieldViolation("start_time", "must not be after end_time")])
        size = self._pager.size(page_size)
        scope = actor or "*"
        after = self._pager.after(scope, page_token)
        cursor = (after[0], int(after[1])) if after else None
        events = await self._store.list_audit_events(actor, start, end, cursor, size + 1)
        return self._pager.page(events, size, scope, lambda e: (e.time, e.id))
