"""Acting on cards found in a report: close them, or flag one as "not mine".

Each card's action is persisted before the call answers and carried out by
the orchestrator like a bank task (leases, retries with backoff, a deadline),
so it survives restarts. The call waits a moment for the banks' answers so a
person usually sees the outcome at once; otherwise they see PENDING and can
come back with GetCardClosure or GetReport.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from server.common import errors
from server.union.clock import Clock
from server.union.domain import model, validation
from server.union.domain.audit import AuditTrail
from server.union.domain.events import LookupEvents
from server.union.domain.identity import Caller
from server.union.domain.orchestrator import Orchestrator
from server.union.domain.paging import Pager
from server.union.domain.ports import CardActionServiceStore, DuplicateRequest, RequestMismatch
from server.union.domain.quotas import take_quota
from server.union.keyring import Keys

MAX_CARDS_PER_CLOSURE = 20
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100


@dataclass(frozen=True)
class CardActionPolicy:
    # How long CreateCardClosure / FlagCardNotMine wait for the banks before answering PENDING.
    answer_wait: timedelta = timedelta(seconds=3)
    # After this, an action whose bank never answered is FAILED.
    deadline: timedelta = timedelta(hours=24)
    # Closures a person may request per window: each one calls banks, and unlike a flag (one per
    # card) a closure can be asked for again and again under new request ids.
    max_closures_per_window: int = 10
    closure_window: timedelta = timedelta(hours=1)


class CardActionService:
    def __init__(
        self,
        store: CardActionServiceStore,
        keys: Keys,
        clock: Clock,
        events: LookupEvents,
        orchestrator: Orchestrator,
        audit: AuditTrail,
        policy: CardActionPolicy,
    ) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        self._events = events
        self._orchestrator = orchestrator
        self._audit = audit
        self._pager = Pager(keys, "closures", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        self.policy = policy

    async def _report_cards(self, caller: Caller, report_id: str) -> dict[str, model.ReportCardSource]:
        cards = await self._store.report_card_sources(report_id, caller.person_hash, self._clock.now())
        if cards is None:
            raise errors.NotFound("report not found")
        return cards

    def _seal_for_bank(self, caller: Caller, action_id: str) -> str:
        name, resident_id = caller.identity(self._keys)
        return self._keys.seal({"name": name, "id": resident_id}, context=f"action:{action_id}")

    async def create_closure(
        self, caller: Caller, request_id: str, report_name: str, card_refs: Sequence[str]
    ) -> model.CardClosure:
        async with self._audit.action(caller.person_hash, "card.close") as audited:
            violations: list[errors.FieldViolation] = []
            report_id = validation.resource_id(report_name, "reports", "report", violations)
            if not validation.REQUEST_ID.fullmatch(request_id):
                violations.append(
                    errors.FieldViolation("request_id", "must be 1-64 characters of [A-Za-z0-9_-]")
                )
            if not card_refs:
                violations.append(errors.FieldViolation("card_refs", "name at least one card"))
            if len(card_refs) > MAX_CARDS_PER_CLOSURE:
                violations.append(
                    errors.FieldViolation("card_refs", f"at most {MAX_CARDS_PER_CLOSURE} cards")
                )
            if len(set(card_refs)) != len(card_refs):
                violations.append(errors.FieldViolation("card_refs", "must not repeat a card"))
            validation.require(violations)

            request_key = validation.request_key(self._keys, caller.person_hash, request_id)
            fingerprint = validation.fingerprint("closure", report_id, *sorted(card_refs))
            try:
                existing = await self._store.find_closure_by_request(
                    caller.person_hash, request_key, fingerprint
                )
            except RequestMismatch:
                raise validation.request_id_reused() from None
            if existing is None:
                cards = await self._report_cards(caller, report_id)
                validation.require(
                    [
                        errors.FieldViolation(f"card_refs[{index}]", "not a card of this report")
                        for index, ref in enumerate(card_refs)
                        if ref not in cards
                    ]
                )
                now = self._clock.now()
                retry_after = await take_quota(
                    self._store,
                    self._keys,
                    "closure",
                    caller.person_hash,
                    self.policy.max_closures_per_window,
                    self.policy.closure_window,
                    now,
                )
                if retry_after is not None:
                    raise errors.ResourceExhausted(
                        "too many card closures requested; try again later",
                        reason="CLOSURE_RATE_LIMITED",
                        retry_after=retry_after,
                    )
                closure_id = "k" + secrets.token_hex(12)
                items = []
                for ref in card_refs:
                    action_id = "a" + secrets.token_hex(12)
                    items.append((action_id, cards[ref], self._seal_for_bank(caller, action_id)))
                try:
                    existing = await self._store.create_card_closure(
                        closure_id,
                        caller.person_hash,
                        request_key,
                        fingerprint,
                        report_id,
                        items,
                        now,
                        now + self.policy.deadline,
                    )
                except DuplicateRequest:
                    try:
                        existing = await self._store.find_closure_by_request(
                            caller.person_hash, request_key, fingerprint
                        )
                    except RequestMismatch:
                        raise validation.request_id_reused() from None
                    if existing is None:
                        raise
                self._orchestrator.wake()
            closure = await self._wait_closure(caller, existing)
            audited.resource = closure.name
            audited.value = "requested:" + ",".join(sorted({item.state.value for item in closure.items}))
            return closure

    async def _wait_closure(self, caller: Caller, closure: model.CardClosure) -> model.CardClosure:
        deadline = time.monotonic() + self.policy.answer_wait.total_seconds()
        while not closure.final and time.monotonic() < deadline:
            await self._events.wait(closure.id, min(0.5, max(0.0, deadline - time.monotonic())))
            refreshed = await self._store.get_card_closure(closure.id, caller.person_hash)
            if refreshed is None:
                break
            closure = refreshed
        return closure

    async def get_closure(self, caller: Caller, name: str) -> model.CardClosure:
        async with self._audit.action(caller.person_hash, "closure.read") as audited:
            closure_id = validation.parse_resource_name(name, "closures")
            closure = await self._store.get_card_closure(closure_id, caller.person_hash)
            if closure is None:
                raise errors.NotFound("closure not found")
            audited.resource = closure.name
            return closure

    async def list_closures(
        self, caller: Caller, page_size: int, page_token: str
    ) -> tuple[list[model.CardClosure], str]:
        async with self._audit.action(caller.person_hash, "closure.list"):
            size = self._pager.size(page_size)
            after = self._pager.after(caller.person_hash, page_token)
            closures = await self._store.list_card_closures(caller.person_hash, after, size + 1)
            return self._pager.page(closures, size, caller.person_hash, lambda c: (c.create_time, c.id))

    async def flag_not_mine(
        self, caller: Caller, request_id: str, report_name: str, card_ref: str
    ) -> model.CardAction:
        async with self._audit.action(caller.person_hash, "card.flag") as audited:
            violations: list[errors.FieldViolation] = []
            report_id = validation.resource_id(report_name, "reports", "report", violations)
            if not validation.REQUEST_ID.fullmatch(request_id):
                violations.append(
                    errors.FieldViolation("request_id", "must be 1-64 characters of [A-Za-z0-9_-]")
                )
            validation.require(violations)
            cards = await self._report_cards(caller, report_id)
            audited.resource = f"reports/{report_id}"  # only once it proved to be the caller's
            card = cards.get(card_ref)
            if card is None:
                raise errors.InvalidArgument([errors.FieldViolation("card_ref", "not a card of this report")])
            now = self._clock.now()
            action_id = "a" + secrets.token_hex(12)
            try:
                flag, created = await self._store.create_flag(
                    action_id,
                    caller.person_hash,
                    validation.request_key(self._keys, caller.person_hash, request_id),
                    validation.fingerprint("flag", report_id, card_ref),
                    card,
                    self._seal_for_bank(caller, action_id),
                    now,
                    now + self.policy.deadline,
                )
            except RequestMismatch:
                raise validation.request_id_reused() from None
            if created:
                self._orchestrator.wake()
            deadline = time.monotonic() + self.policy.answer_wait.total_seconds()
            while flag.state == model.ActionState.PENDING and time.monotonic() < deadline:
                await self._events.wait(flag.id, min(0.5, max(0.0, deadline - time.monotonic())))
                flag = await self._store.get_card_action(flag.id) or flag
            audited.value = flag.state.value if created else f"existing:{flag.state.value}"
            return flag

    async def list_my_audit_events(
        self, caller: Caller, page_size: int, page_token: str
    ) -> tuple[list[model.AuditEvent], str]:
        person = caller.person_hash
        return await self._audit.read(person, person, None, None, page_size, page_token, operator=False)
