"""What the domain needs from storage, as one protocol per aggregate.

The domain services depend on these, never on a concrete store: the rules read
(and test) apart from the SQL that keeps them, and the import-linter contract in
pyproject.toml keeps server.union.domain from importing server.union.storage or
SQLAlchemy. server.union.storage implements every port (one module per
aggregate; `Store` is all of them on one database), and the composition root
(server.union.union_server) wires it in. The storage contract suite
(tests/union/storage_contract/) says what an implementation must do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from server.common import errors
from server.population.catalogue import BankInfo, RegionInfo
from server.union.domain import model

PlanFactory = Callable[[], model.ReportPlan]


class StoreUnavailable(errors.Unavailable):
    """The database could not be reached or answered with an operational error (UNAVAILABLE)."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "the service's database is unavailable; retry shortly", retry_after=timedelta(seconds=2)
        )
        self.detail = detail


class RequestMismatch(Exception):
    """This (person, request_id) already made something, from a different request (AIP-155)."""


class DuplicateRequest(Exception):
    """A resource with this (person, request_id) already exists (a racing retry)."""


class CatalogueStore(Protocol):
    """Banks and regions: which are enabled and open, and where the banks listen."""

    async def seed_catalogue(
        self,
        banks: Sequence[BankInfo],
        addresses: dict[str, str],
        regions: Sequence[RegionInfo],
        now: datetime,
    ) -> None:
        """Insert banks and regions that are not there yet; never overwrite an operator's change."""
        ...

    async def set_bank_addresses(self, addresses: dict[str, str]) -> None: ...

    async def list_banks(self) -> list[model.Bank]:
        """Every bank in catalogue order (may be a copy up to a second old)."""
        ...

    async def update_bank(self, code: str, enabled: bool | None, address: str | None) -> model.Bank | None:
        """Change what is given (not None, not empty); None if there is no such bank."""
        ...

    async def create_bank(self, new: model.NewBank) -> model.Bank | None:
        """A bank joining the service, enabled, after every bank there is; None if its code or
        CNAPS code is taken."""
        ...

    async def list_regions(self) -> list[model.Region]: ...

    async def get_region(self, code: str) -> model.Region | None: ...

    async def update_region(self, code: str, is_open: bool, now: datetime) -> model.Region | None: ...


class IdentityStore(Protocol):
    """The identity registry and the verifications made against it."""

    async def identity_count(self) -> int: ...

    async def add_identities(self, rows: Iterable[tuple[str, str, str, str]]) -> None:
        """Insert (person_hash, name_hash, mobile_hash, region_code) rows, skipping known people."""
        ...

    async def find_identity(self, person_hash: str) -> model.RegisteredIdentity | None: ...

    async def add_verification(self, new: model.NewVerification) -> None: ...

    async def get_verification(self, verification_id: str) -> model.Verification | None: ...

    async def fail_verification_attempt(self, verification_id: str, max_attempts: int) -> int:
        """Count a wrong code; at the limit the sealed identity is erased. Returns attempts left."""
        ...

    async def complete_verification(self, verification_id: str, now: datetime) -> str | None:
        """Mark used (once) and hand back the sealed identity, erasing it; None if not possible."""
        ...


class QuotaStore(Protocol):
    async def take_quota_slot(
        self, key: str, limit: int, window: timedelta, now: datetime
    ) -> timedelta | None:
        """Take one of `key`'s `limit` slots for `window`: None if taken, else how long until one
        frees. One decision, exact under concurrent callers on every backend."""
        ...


class LookupStore(Protocol):
    """Lookups and their per-bank tasks: creation, claims, answers, and the report at the end."""

    async def find_lookup_by_request(
        self, person_hash: str, request_id: str, request_fingerprint: str
    ) -> model.Lookup | None:
        """The lookup this person's `request_id` made, if any; RequestMismatch if another request made it."""
        ...

    async def create_lookup(
        self,
        lookup_id: str,
        person_hash: str,
        request_id: str,
        request_fingerprint: str,
        region_code: str,
        sealed_identity: str,
        sealed_contact: str | None,
        banks: Sequence[model.Bank],
        now: datetime,
        deadline: datetime,
        claim: model.ClaimRequest | None = None,
        audit: model.AuditEntry | Sequence[model.AuditEntry] | None = None,
        admit: Callable[[model.PersonActivity], model.Admission | None] | None = None,
    ) -> tuple[model.Lookup, list[model.Claim], bool]:
        """The lookup and one pending task per bank, in one transaction: (lookup, claims, created).
        An existing lookup of this request is returned instead; `admit` sees the person's activity
        (with when each bank last answered them) and may refuse by raising, or narrow the banks
        asked (an Admission); DuplicateRequest if a racing retry created it first."""
        ...

    async def get_lookup(self, lookup_id: str, person_hash: str | None) -> model.Lookup | None: ...

    async def list_lookups(
        self, person_hash: str, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[model.Lookup]: ...

    async def claim_due_tasks(
        self, owner: str, now: datetime, lease: timedelta, limit: int, skip_banks: Iterable[str] = ()
    ) -> list[model.Claim]: ...

    async def release_leases(self, owner: str) -> int:
        """Hand back this replica's unfinished bank tasks and card actions (graceful shutdown)."""
        ...

    async def record_answer(
        self,
        lookup_id: str,
        bank_code: str,
        owner: str,
        cards: Sequence[tuple[str, model.MaskedCard]],
        latency_ms: int,
        now: datetime,
        plan: PlanFactory,
    ) -> tuple[bool, bool]:
        """A bank's complete answer, once, by the lease holder: (recorded, report written)."""
        ...

    async def record_attempt_failed(
        self,
        lookup_id: str,
        bank_code: str,
        owner: str,
        reason: str,
        retry_at: datetime | None,
        now: datetime,
        plan: PlanFactory,
    ) -> tuple[bool, bool]: ...

    async def finalize_lookup(
        self, lookup_id: str, plan: PlanFactory, now: datetime, force: bool
    ) -> bool: ...

    async def lookups_past_deadline(self, now: datetime, limit: int) -> list[str]: ...

    async def running_lookups_without_pending_tasks(self, limit: int) -> list[str]: ...

    async def next_due_time(self) -> datetime | None:
        """When the earliest pending task, card action or deadline falls due."""
        ...


class ReportStore(Protocol):
    async def get_report(self, report_id: str, person_hash: str, now: datetime) -> model.Report | None: ...

    async def list_reports(
        self, person_hash: str, now: datetime, after: tuple[datetime, str] | None, limit: int
    ) -> list[model.Report]: ...

    async def delete_report(
        self, report_id: str, person_hash: str, now: datetime, cooldown: timedelta
    ) -> bool:
        """Delete the person's report with its lookup; the banks that answered keep the person's
        re-query cooldown (`cooldown` from when the lookup completed)."""
        ...

    async def report_card_sources(
        self, report_id: str, person_hash: str, now: datetime
    ) -> dict[str, model.ReportCardSource] | None:
        """The cards of one of the person's unexpired reports, keyed by card_ref; None if no such report."""
        ...


class CardActionStore(Protocol):
    """Card closures and "not mine" flags, carried out like bank tasks (leases, retries, a deadline)."""

    async def create_card_closure(
        self,
        closure_id: str,
        person_hash: str,
        request_id: str,
        request_fingerprint: str,
        report_id: str,
        items: Sequence[tuple[str, model.ReportCardSource, str]],
        now: datetime,
        deadline: datetime,
    ) -> model.CardClosure: ...

    async def find_closure_by_request(
        self, person_hash: str, request_id: str, request_fingerprint: str
    ) -> model.CardClosure | None: ...

    async def get_card_closure(self, closure_id: str, person_hash: str) -> model.CardClosure | None: ...

    async def list_card_closures(
        self, person_hash: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[model.CardClosure]: ...

    async def create_flag(
        self,
        action_id: str,
        person_hash: str,
        request_id: str,
        request_fingerprint: str,
        card: model.ReportCardSource,
        sealed_identity: str,
        now: datetime,
        deadline: datetime,
    ) -> tuple[model.CardAction, bool]: ...

    async def get_card_action(self, action_id: str) -> model.CardAction | None: ...

    async def claim_due_actions(
        self, owner: str, now: datetime, lease: timedelta, limit: int
    ) -> list[model.ActionClaim]: ...

    async def record_action(
        self,
        action_id: str,
        owner: str,
        state: model.ActionState,
        ticket: str,
        reason: str,
        retry_at: datetime | None,
        now: datetime,
    ) -> model.CardAction | None: ...

    async def fail_overdue_actions(self, now: datetime, limit: int = 200) -> list[model.CardAction]: ...


class AuditStore(Protocol):
    async def add_audit_event(
        self, time: datetime, actor: str, action: str, outcome: str, resource: str
    ) -> None: ...

    async def list_audit_events(
        self,
        actor: str | None,
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, int] | None,
        limit: int,
    ) -> list[model.AuditEvent]: ...


class NotificationStore(Protocol):
    """The report-ready outbox, written with the report and emptied as messages go out."""

    async def pending_notifications(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """(lookup_id, report_id, sealed_contact) of reports not yet announced."""
        ...

    async def delete_notifications(self, lookup_ids: Sequence[str]) -> int: ...


class StatsStore(Protocol):
    async def stats(self) -> model.ServiceStats: ...


class RetentionStore(Protocol):
    """The purges the retention sweep runs: each deletes what its retention ended before `before`."""

    async def purge_expired_reports(self, now: datetime, limit: int = ...) -> int: ...
    async def erase_stale_verifications(self, now: datetime) -> int: ...
    async def purge_verifications(self, before: datetime, limit: int = ...) -> int: ...
    async def purge_card_actions(self, before: datetime, limit: int = ...) -> int: ...
    async def purge_notifications(self, before: datetime, limit: int = ...) -> int: ...
    async def purge_audit_events(self, before: datetime, limit: int = ...) -> int: ...
    async def purge_verified_people(self, before: datetime, limit: int = ...) -> int: ...
    async def purge_quota_slots(self, before: datetime) -> int: ...
    async def purge_bank_cooldowns(self, now: datetime) -> int: ...


class OrchestratorStore(
    LookupStore, CardActionStore, CatalogueStore, NotificationStore, RetentionStore, Protocol
):
    """What the orchestrator works with: bank tasks, card actions, the bank catalogue, the outbox,
    and the retention sweep it runs."""


class LookupServiceStore(LookupStore, ReportStore, CatalogueStore, Protocol):
    """What the person-facing lookup service reads and writes."""


class IdentityServiceStore(IdentityStore, CatalogueStore, QuotaStore, Protocol):
    """What identity verification reads and writes."""


class AdminServiceStore(CatalogueStore, StatsStore, Protocol):
    """What the admin surface reads and changes."""


class CardActionServiceStore(CardActionStore, ReportStore, QuotaStore, Protocol):
    """What closing and flagging cards reads and writes."""


class AdminRole(StrEnum):
    VIEWER = "viewer"  # the List and Get methods
    OPERATOR = "operator"  # every method, changes included


@dataclass(frozen=True)
class AdminCredential:
    """A named operator credential; its token is never kept, only a keyed hash of it."""

    id: str
    name: str
    role: AdminRole
    create_time: datetime

    @property
    def actor(self) -> str:
        """How the audit trail names what this credential did."""
        return f"admin:{self.id}"


class SessionRegistry(Protocol):
    """The one live session of each person (see storage.models.SessionRow)."""

    async def start_session(self, person_hash: str, token_id: str, expire_time: datetime) -> None:
        """Make `token_id` the person's live session, revoking any older one."""
        ...

    async def live_session(self, person_hash: str) -> str | None:
        """The token id of the person's live session, or None (signed out, replaced, or purged)."""
        ...

    async def end_session(self, person_hash: str, token_id: str) -> bool:
        """Revoke the session `token_id` if it is the live one; whether it was."""
        ...

    async def purge_expired_sessions(self, now: datetime, limit: int = 1000) -> int:
        """Forget sessions that have expired anyway; how many went."""
        ...


class AdminCredentialStore(Protocol):
    async def add_credential(self, credential: AdminCredential, key_id: str, token_hash: str) -> None:
        """Store a new credential; DuplicateCredentialName if the name is taken."""
        ...

    async def find_credential(self, token_hashes: dict[str, str]) -> AdminCredential | None:
        """The credential whose token hashes to `token_hashes[key id]` under its key, if any."""
        ...

    async def set_credential(
        self, name: str, role: AdminRole, key_id: str, token_hash: str, now: datetime, new_id: str
    ) -> tuple[AdminCredential, bool]:
        """Create the credential `name` or give it this token and role; (it, whether it changed)."""
        ...

    async def list_credentials(self) -> list[AdminCredential]: ...

    async def delete_credential(self, name: str) -> AdminCredential | None:
        """Revoke (delete) the credential `name`; the one deleted, if there was one."""
        ...


class DuplicateCredentialName(Exception):
    """Another credential already has this name."""
