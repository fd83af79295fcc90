"""Lookups and reports for one verified caller: create, follow, read, list, delete.

Ownership is enforced here and in the store queries alike: every read is keyed
by the caller's person_hash, and anything that is not theirs is NOT_FOUND,
exactly like something that does not exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.common import errors
from server.union.clock import Clock
from server.union.domain import model, validation
from server.union.domain.audit import AuditTrail, Outcome
from server.union.domain.events import LookupEvents
from server.union.domain.identity import Caller
from server.union.domain.metrics import Metrics, NoMetrics
from server.union.domain.orchestrator import Orchestrator
from server.union.domain.paging import Pager
from server.union.domain.ports import DuplicateRequest, LookupServiceStore, RequestMismatch
from server.union.keyring import Keys

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100
# The version of the terms a person accepts before a lookup (CreateLookupRequest.consent_terms_version).
CURRENT_TERMS_VERSION = "2021-12"


@dataclass(frozen=True)
class LookupPolicy:
    # A bank that answered one of a person's lookups is asked for them again only this long after
    # that lookup completed (the seed: 7 days). Banks that failed or did not answer: at once.
    requery_cooldown: timedelta = timedelta(days=7)
    # The terms a person must have accepted; a new version asks everyone to accept again.
    terms_version: str = CURRENT_TERMS_VERSION
    # Watchers re-read at least this often (changes made by other replicas).
    watch_poll_interval: timedelta = timedelta(seconds=1)
    # After a change, wait this long for more before re-reading (fewer reads, a little latency).
    watch_coalesce: timedelta = timedelta(milliseconds=5)


@dataclass(frozen=True)
class WatchEvent:
    lookup: model.Lookup
    bank_codes: tuple[str, ...]  # the banks whose progress changed; none for the first and last events
    report_ready: bool


class LookupService:
    def __init__(
        self,
        store: LookupServiceStore,
        keys: Keys,
        clock: Clock,
        events: LookupEvents,
        orchestrator: Orchestrator,
        policy: LookupPolicy,
        audit: AuditTrail,
        metrics: Metrics | None = None,
    ) -> None:
        self._audit = audit
        self._metrics = metrics or NoMetrics()
        self._pager = Pager(keys, "reports", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        self._store = store
        self._keys = keys
        self._clock = clock
        self._events = events
        self._orchestrator = orchestrator
        self.policy = policy

    async def create_lookup(
        self, caller: Caller, request_id: str, bank_codes: Sequence[str], consent_terms_version: str = ""
    ) -> model.Lookup:
        async with self._audit.action(caller.person_hash, "lookup.create") as audited:
            lookup = await self._create(caller, request_id, bank_codes, consent_terms_version, audited)
            audited.resource = lookup.name
            return lookup

    async def _create(
        self,
        caller: Caller,
        request_id: str,
        bank_codes: Sequence[str],
        consent_terms_version: str,
        audited: Outcome,
    ) -> model.Lookup:
        violations = []
        if not validation.REQUEST_ID.fullmatch(request_id):
            violations.append(errors.FieldViolation("request_id", "must be 1-64 characters of [A-Za-z0-9_-]"))
        if len(bank_codes) > 64:
            violations.append(errors.FieldViolation("bank_codes", "at most 64 bank codes"))
        validation.require(violations)
        if consent_terms_version != self.policy.terms_version:
            # Never echoed: the refusal names the version the union serves, not the one sent.
            raise errors.FailedPrecondition(
                "the person must accept the current terms before a lookup",
                reason="CONSENT_REQUIRED",
                metadata={"terms_version": self.policy.terms_version},
            )

        request_key = validation.request_key(self._keys, caller.person_hash, request_id)
        fingerprint = validation.fingerprint("lookup", *sorted(set(bank_codes)))
        try:
            chosen, not_asked = await self._chosen_banks(caller, bank_codes)
        except (errors.FailedPrecondition, errors.InvalidArgument):
            # AIP-155: a retry returns what the first call made, whatever has changed since (the
            # region closed, a bank left). Only a new request is refused.
            try:
                existing = await self._store.find_lookup_by_request(
                    caller.person_hash, request_key, fingerprint
                )
            except RequestMismatch:
                raise validation.request_id_reused() from None
            if existing is not None:
                return existing
            raise

        now = self._clock.now()

        def admit(activity: model.PersonActivity) -> model.Admission:
            # Runs in the creating transaction (see LookupStore.create_lookup): raising writes nothing.
            if activity.running:
                raise errors.ResourceExhausted(
                    "a lookup is already in progress",
                    reason="LOOKUP_IN_PROGRESS",
                    retry_after=timedelta(minutes=1),
                )
            return self._admit(chosen, not_asked, activity, bool(bank_codes), now)

        name, resident_id, mobile = caller.contact(self._keys)
        lookup_id = "l" + secrets.token_hex(12)
        creation = self._audit.entry(caller.person_hash, "lookup.create", f"lookups/{lookup_id}")
        consent = f"terms/{self.policy.terms_version}"
        try:
            lookup, claims, created = await self._store.create_lookup(
                lookup_id=lookup_id,
                person_hash=caller.person_hash,
                request_id=request_key,
                request_fingerprint=fingerprint,
                region_code=caller.region_code,
                sealed_identity=self._keys.seal(
                    {"name": name, "id": resident_id}, context=f"lookup:{lookup_id}"
                ),
                sealed_contact=(
                    self._keys.seal({"mobile": mobile}, context=f"contact:{lookup_id}") if mobile else None
                ),
                banks=chosen,
                now=now,
                deadline=now + self._orchestrator.policy.lookup_deadline,
                claim=self._orchestrator.claim_request(chosen),
                # Audited in the lookup's own transaction: one write, and never one without the other.
                # The consent is its own event, written with the lookup's (same actor, same time),
                # naming the terms version only.
                audit=[creation, dataclasses.replace(creation, action="lookup.consent", resource=consent)],
                admit=admit,
            )
        except RequestMismatch:
            raise validation.request_id_reused() from None
        except DuplicateRequest:
            # Two retries of the same request raced; the other one won.
            try:
                raced = await self._store.find_lookup_by_request(caller.person_hash, request_key, fingerprint)
            except RequestMismatch:
                raise validation.request_id_reused() from None
            if raced is None:
                raise
            return raced
        if not created:
            return lookup  # this request_id's lookup, made by an earlier call
        audited.recorded = True
        self._metrics.lookup_created(lookup.id)
        self._orchestrator.dispatch(claims)
        if len(claims) < len(lookup.banks):
            self._orchestrator.wake()  # the banks it had no room for go through the queue
        return lookup

    def _admit(
        self,
        chosen: list[model.Bank],
        not_asked: list[tuple[model.Bank, model.UnaskedReason]],
        activity: model.PersonActivity,
        chose: bool,
        now: datetime,
    ) -> model.Admission:
        """The per-bank re-query cooldown, one decision with the lookup's creation: a chosen bank
        that answered within the cooldown refuses the whole request (the person named it); without
        a choice, such banks are left out, and only if every bank is cooling down is it refused."""
        cooldown = self.policy.requery_cooldown
        cooling = {
            bank.code: answered + cooldown
            for bank in chosen
            if (answered := activity.answered_banks.get(bank.code)) is not None and answered + cooldown > now
        }
        asked = [bank for bank in chosen if bank.code not in cooling]
        if cooling and (chose or not asked):
            codes = [bank.code for bank in chosen if bank.code in cooling]
            # A choice waits for the last of its banks; "every bank" for the first that is free.
            free_at = max(cooling.values()) if chose else min(cooling.values())
            raise errors.ResourceExhausted(
                "a bank answered a lookup of yours within the re-query cooldown",
                reason="REQUERY_COOLDOWN",
                retry_after=free_at - now,
                metadata={"bank_codes": ",".join(codes)},
            )
        unasked = [
            *(model.UnaskedBank(bank.code, bank.name, reason) for bank, reason in not_asked),
            *(
                model.UnaskedBank(
                    bank.code, bank.name, model.UnaskedReason.REQUERY_COOLDOWN, cooling[bank.code]
                )
                for bank in chosen
                if bank.code in cooling
            ),
        ]
        positions = {bank.code: bank.position for bank, _ in not_asked} | {b.code: b.position for b in chosen}
        unasked.sort(key=lambda bank: positions[bank.bank_code])
        return model.Admission(asked, unasked)

    async def _chosen_banks(
        self, caller: Caller, bank_codes: Sequence[str]
    ) -> tuple[list[model.Bank], list[tuple[model.Bank, model.UnaskedReason]]]:
        """The enabled banks a new lookup may ask (all of them, or those named) and the others
        with why they are not asked, if the caller's region is open; FAILED_PRECONDITION or
        INVALID_ARGUMENT otherwise."""
        region = await self._store.get_region(caller.region_code)
        if region is None or not region.open:
            raise errors.FailedPrecondition(
                "the service is not open in your region yet",
                reason="REGION_NOT_OPEN",
                metadata={"region_code": caller.region_code},
            )
        all_banks = await self._store.list_banks()
        known = {bank.code: bank for bank in all_banks}
        unknown = [code for code in bank_codes if code not in known]
        validation.require(
            [
                errors.FieldViolation(f"bank_codes[{list(bank_codes).index(c)}]", "unknown bank code")
                for c in unknown
            ]
        )
        chosen = [bank for bank in all_banks if bank.enabled and (not bank_codes or bank.code in bank_codes)]
        if not chosen:
            raise errors.FailedPrecondition("none of the chosen banks is enabled", reason="NO_ENABLED_BANK")
        not_asked = [
            (
                bank,
                model.UnaskedReason.NOT_CHOSEN
                if bank_codes and bank.code not in bank_codes
                else model.UnaskedReason.BANK_DISABLED,
            )
            for bank in all_banks
            if bank not in chosen
        ]
        return chosen, not_asked

    async def get_lookup(self, caller: Caller, name: str) -> model.Lookup:
        async with self._audit.action(caller.person_hash, "lookup.read") as audited:
            lookup = await self._read_lookup(caller, validation.parse_resource_name(name, "lookups"))
            # Named in the trail only once it proved to be the caller's: nothing typed is kept.
            audited.resource = lookup.name
            return lookup

    async def _read_lookup(self, caller: Caller, lookup_id: str) -> model.Lookup:
        """The caller's lookup, or NOT_FOUND: also once its report has expired (the purge deletes
        both; until it runs, neither is served)."""
        lookup = await self._store.get_lookup(lookup_id, caller.person_hash)
        if lookup is None or (
            lookup.report_expire_time is not None and lookup.report_expire_time <= self._clock.now()
        ):
            raise errors.NotFound("lookup not found")
        return lookup

    async def watch_lookup(
        self, caller: Caller, name: str, group_bank_changes: bool = False
    ) -> AsyncIterator[WatchEvent]:
        """The current state first, then one event per bank change (or, grouped, one per re-read
        that found changes), ending with the one event that says the report is ready."""
        with contextlib.ExitStack() as stack:
            async with self._audit.action(caller.person_hash, "lookup.watch") as audited:
                lookup_id = validation.parse_resource_name(name, "lookups")
                # Subscribed before the first read: no change is missed.
                changes = stack.enter_context(self._events.subscribe(lookup_id))
                lookup = await self._read_lookup(caller, lookup_id)
                audited.resource = lookup.name
            if lookup.state == model.LookupState.COMPLETED:
                yield WatchEvent(lookup, (), True)
                return
            yield WatchEvent(lookup, (), False)
            previous = {bank.bank_code: bank for bank in lookup.banks}
            completed = False
            while not completed:
                await changes.wait(
                    self.policy.watch_poll_interval.total_seconds(),
                    self.policy.watch_coalesce.total_seconds(),
                )
                lookup = await self._read_lookup(caller, lookup_id)
                changed = tuple(
                    bank.bank_code for bank in lookup.banks if previous.get(bank.bank_code) != bank
                )
                if group_bank_changes and changed:
                    yield WatchEvent(lookup, changed, False)
                elif changed:
                    for bank_code in changed:
                        yield WatchEvent(lookup, (bank_code,), False)
                previous = {bank.bank_code: bank for bank in lookup.banks}
                completed = lookup.state == model.LookupState.COMPLETED
            yield WatchEvent(lookup, (), True)

    async def get_report(self, caller: Caller, name: str) -> model.Report:
        async with self._audit.action(caller.person_hash, "report.read") as audited:
            report_id = validation.parse_resource_name(name, "reports")
            report = await self._store.get_report(report_id, caller.person_hash, self._clock.now())
            if report is None:
                raise errors.NotFound("report not found")
            audited.resource = report.name
            return self._with_next_query_times(report)

    def _with_next_query_times(self, report: model.Report) -> model.Report:
        """When this report lets the person ask each of its banks again: a bank that answered
        after the cooldown, one that failed or did not answer at once."""
        return dataclasses.replace(
            report,
            next_query_times={
                bank.bank_code: report.generate_time
                + (
                    self.policy.requery_cooldown
                    if bank.outcome == model.BankOutcome.ANSWERED
                    else timedelta()
                )
                for bank in report.banks
            },
        )

    async def list_reports(
        self, caller: Caller, page_size: int, page_token: str
    ) -> tuple[list[model.Report], str]:
        async with self._audit.action(caller.person_hash, "report.list"):
            size = self._pager.size(page_size)
            after = self._pager.after(caller.person_hash, page_token)
            reports = await self._store.list_reports(caller.person_hash, self._clock.now(), after, size + 1)
            reports = [self._with_next_query_times(report) for report in reports]
            return self._pager.page(reports, size, caller.person_hash, lambda r: (r.generate_time, r.id))

    async def delete_report(self, caller: Caller, name: str) -> None:
        async with self._audit.action(caller.person_hash, "report.delete") as audited:
            report_id = validation.parse_resource_name(name, "reports")
            deleted = await self._store.delete_report(
                report_id, caller.person_hash, self._clock.now(), self.policy.requery_cooldown
            )
            if not deleted:
                raise errors.NotFound("report not found")
            audited.resource = f"reports/{report_id}"

    async def list_lookups(
        self, caller: Caller, page_size: int, page_token: str
    ) -> tuple[list[model.Lookup], str]:
        """The caller's running lookups and those whose report is still readable, newest first."""
        pager = Pager(self._keys, "lookups", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        async with self._audit.action(caller.person_hash, "lookup.list"):
            size = pager.size(page_size)
            after = pager.after(caller.person_hash, page_token)
            lookups = await self._store.list_lookups(caller.person_hash, self._clock.now(), after, size + 1)
            return pager.page(
                lookups, size, caller.person_hash, lambda lookup: (lookup.create_time, lookup.id)
            )
