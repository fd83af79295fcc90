"""Runs every lookup's bank work to the end, durably.

The work queue is the `bank_tasks` table. The replica that creates a lookup
leases its tasks in the creating transaction and starts the calls at once
(`claim_request` / `dispatch`); this loop claims everything else that falls due
(retries, banks that had no room, leases a dead replica left) the same way.
Calls are bounded per bank, so a hung bank holds only its own share. Outcomes
are recorded as they come (the store writes answers that arrive together in
one transaction). A failed attempt is retried with exponential backoff and full
jitter while the lookup's deadline allows (a truncated answer only up to
`truncated_answer_attempts`, then the bank is FAILED); at the deadline the
report is finalised and every silent bank is marked NO_RESPONSE. Because claims are
leases in the database, a restarted union (or another replica) picks up
whatever a dead one left; because the report row is unique per lookup, no
lookup is ever reported twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from server.union.clock import Clock
from server.union.domain import model
from server.union.domain.audit import AuditTrail
from server.union.domain.banks import BankCallFailed, BankGateway, check_answer
from server.union.domain.events import LookupEvents
from server.union.domain.metrics import Metrics, NoMetrics
from server.union.domain.ports import OrchestratorStore, StoreUnavailable
from server.union.domain.retention import RetentionSweep
from server.union.keyring import Keys, UnreadableSealedValue
from server.union.notify import Notifier

log = logging.getLogger(__name__)


# Ready reports are announced in batches, at most this often (seconds) and this many at a time.
# An SMS half a second late is not noticed; at one announcement per report, the outbox's read and
# delete were a fifth of the union's database work at low load.
ANNOUNCE_INTERVAL = 0.5
NOTIFICATION_BATCH = 100


@dataclass(frozen=True)
class OrchestratorPolicy:
    lookup_deadline: timedelta = timedelta(hours=24)
    call_timeout: timedelta = timedelta(seconds=10)
    # A claim outlives its call by this much; after that a replica that died holding it loses it.
    lease_margin: timedelta = timedelta(seconds=5)
    backoff_base: timedelta = timedelta(seconds=1)
    backoff_max: timedelta = timedelta(minutes=10)
    # A truncated answer (no summary, a count that does not match, a stream that broke off before
    # its summary) is retried like any failed call, but a bank still truncating on this attempt
    # is recorded FAILED at once, as the bank contract reads it: waiting out the lookup deadline
    # would hold the whole report for a day for a bank that answers, wrongly, every time.
    truncated_answer_attempts: int = 3
    # Card actions in flight at once (each is one unary call).
    max_concurrent_calls: int = 256
    # Card queries outstanding per bank. Per bank, so that a hung bank ties up only its own
    # share: every other bank's answers keep flowing.
    max_calls_per_bank: int = 512
    poll_interval: timedelta = timedelta(seconds=1)

    def __post_init__(self) -> None:
        if self.truncated_answer_attempts < 1:
            raise ValueError("truncated_answer_attempts must be at least 1")


class Orchestrator:
    def __init__(
        self,
        store: OrchestratorStore,
        gateway: BankGateway,
        keys: Keys,
        clock: Clock,
        events: LookupEvents,
        policy: OrchestratorPolicy,
        retention: RetentionSweep,
        notifier: Notifier | None = None,
        audit: AuditTrail | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        # Reports' expiry and the purges follow one policy (reports expire at generation + N days).
        self._retention = retention
        self._notifier = notifier
        self._audit = audit
        self._metrics: Metrics = metrics or NoMetrics()
        self._store = store
        self._gateway = gateway
        self._keys = keys
        self._clock = clock
        self._events = events
        self.policy = policy
        self.owner = f"union-{uuid.uuid4().hex[:12]}"
        self._wake = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()
        self._bank_calls: dict[str, int] = {}  # bank code → queries in flight
        self._lookup_calls: dict[str, int] = {}  # lookup id → its queries in flight
        # The opened identity of a lookup while its queries are in flight (opened once, not once
        # per bank; dropped with the lookup's last query, so it lives no longer than before).
        self._identities: dict[str, dict[str, str]] = {}
        self._slots = asyncio.Semaphore(policy.max_concurrent_calls)
        self._actions_in_flight = 0
        self._runner: asyncio.Task[None] | None = None
        self._last_purge = 0.0
        self._next_maintenance = 0.0
        self._announce = False
        self._next_announce = 0.0
        self._announce_due = False
        self._next_due: datetime | None = None
        # Whether the next tick claims: set when work may be waiting (a lookup whose banks had no
        # room, a bank that had no room getting some, a retry scheduled). A wake-up that only
        # announces reports does not claim: an empty claim is two transactions.
        self._claim_due = True
        # Bank catalogue, refreshed at every maintenance (so admin changes apply within a poll interval).
        self._banks: dict[str, model.Bank] = {}

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="orchestrator")

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._runner.done()

    def bank_calls_in_flight(self) -> dict[str, int]:
        """Bank code → calls to it in flight now (a copy, taken in one step: metrics read it from
        another thread)."""
        return dict(self._bank_calls)

    def lookups_in_flight(self) -> int:
        """Lookups with calls in flight now."""
        return len(self._lookup_calls)

    def wake(self) -> None:
        """New work is due now (a lookup was created)."""
        self._claim_due = True
        self._wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; give in-flight calls `grace` seconds, then cancel them (their leases lapse
        and a restarted union resumes them)."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None
        if self._calls:
            _, pending = await asyncio.wait(self._calls, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(StoreUnavailable):  # if so, the leases lapse on their own
            await self._store.release_leases(self.owner)

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    @property
    def lease(self) -> timedelta:
        """How long a claim is held: the call's timeout plus a margin."""
        return self.policy.call_timeout + self.policy.lease_margin

    def claim_request(self, banks: list[model.Bank]) -> model.ClaimRequest:
        """Which of a new lookup's banks this replica takes on as the lookup is created: those it
        has room for (the others wait in the queue for a claim); none once it is stopping."""
        room = frozenset(
            bank.code
            for bank in banks
            if self.running and self._bank_calls.get(bank.code, 0) < self.policy.max_calls_per_bank
        )
        return model.ClaimRequest(self.owner, room, self.lease)

    def dispatch(self, claims: list[model.Claim]) -> None:
        """Start the calls of claims this replica holds."""
        for claim in claims:
            self._bank_calls[claim.bank_code] = self._bank_calls.get(claim.bank_code, 0) + 1
            self._lookup_calls[claim.lookup_id] = self._lookup_calls.get(claim.lookup_id, 0) + 1
            self._spawn(self._attempt(claim), f"bank-call-{claim.bank_code}")

    async def _run(self) -> None:
        while True:
            delay = self.policy.poll_interval.total_seconds()
            try:
                delay = await self.tick()
            except StoreUnavailable as error:
                log.warning("database unavailable, orchestrator backing off", extra={"error": error.detail})
            except Exception:
                log.exception("orchestrator tick failed")
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def tick(self) -> float:
        """One round: start due bank calls and card actions; at most once per poll interval also the
        housekeeping (deadlines, notifications, purge). Returns seconds to sleep."""
        now = self._clock.now()
        claim = self._claim_due or (self._next_due is not None and self._next_due <= now)
        self._claim_due = False
        if time.monotonic() >= self._next_maintenance:
            self._next_maintenance = time.monotonic() + self.policy.poll_interval.total_seconds()
            await self._maintain(now)
            claim = True  # other replicas' work and lapsed leases are found by polling
        elif self._announce and time.monotonic() >= self._next_announce:
            await self._send_notifications()
        lease = self.lease
        full = [code for code, calls in self._bank_calls.items() if calls >= self.policy.max_calls_per_bank]
        if claim and (len(full) < len(self._banks) or not self._banks):
            self.dispatch(await self._store.claim_due_tasks(self.owner, now, lease, 500, skip_banks=full))
        free = self.policy.max_concurrent_calls - self._actions_in_flight
        if claim and free > 0:
            for action_claim in await self._store.claim_due_actions(
                self.owner, now, lease, limit=min(free, 100)
            ):
                self._spawn(self._act(action_claim), f"card-action-{action_claim.bank_code}")
        delay = self._next_maintenance - time.monotonic()
        if self._announce:
            delay = min(delay, self._next_announce - time.monotonic())
        if self._next_due is not None:
            until_due = (self._next_due - self._clock.now()).total_seconds()
            if until_due > 0:
                delay = min(delay, until_due)
            else:
                # Due work was claimed above and the next maintenance finds the next due time.
                # Keeping a past due time here would wake the scheduler every 10 ms until then.
                self._next_due = None
        return max(delay, 0.01)

    async def _maintain(self, now: datetime) -> None:
        """Everything that need not run on every wake-up: it reads whole tables' worth of state."""
        self._banks = {bank.code: bank for bank in await self._store.list_banks()}
        for lookup_id in await self._store.lookups_past_deadline(now, limit=200):
            await self._finalize(lookup_id, force=True)
        for action in await self._store.fail_overdue_actions(now):
            await self._action_final(action)
        await self._send_notifications()
        if time.monotonic() - self._last_purge >= self._retention.policy.interval.total_seconds():
            self._last_purge = time.monotonic()
            # A union from before answers and reports were written together may have left these.
            for lookup_id in await self._store.running_lookups_without_pending_tasks(limit=200):
                await self._finalize(lookup_id, force=False)
            await self._retention.sweep(now)
        self._next_due = await self._store.next_due_time()

    def _room_made(self) -> None:
        """A call finished where there was no room: what waits for it is claimed now, not at the
        next poll."""
        self._claim_due = True
        self._wake.set()

    def _due_at(self, when: datetime) -> None:
        """Something this replica scheduled falls due at `when`: sleep no longer than that."""
        if self._next_due is None or when < self._next_due:
            self._next_due = when

    def _plan(self) -> model.ReportPlan:
        now = self._clock.now()
        return model.ReportPlan(
            "r" + secrets.token_hex(12),
            self._retention.policy.report_expire_time(now),
        )

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    # -- notifications --------------------------------------------------------

    async def _send_notifications(self) -> None:
        """Announce ready reports from the outbox; a row is deleted only after its message went out.

        One thread hop and one delete for everything pending: at hundreds of reports a second, a
        round trip per message was a noticeable share of the union's time."""
        self._announce = self._announce_due = False
        self._next_announce = time.monotonic() + ANNOUNCE_INTERVAL
        if self._notifier is None:
            return
        pending = await self._store.pending_notifications(NOTIFICATION_BATCH)
        if not pending:
            return
        messages, unreadable = [], []
        for lookup_id, report_id, sealed in pending:
            try:
                mobile = self._keys.unseal(sealed, context=f"contact:{lookup_id}")["mobile"]
            except (UnreadableSealedValue, KeyError):
                # Sealed under a key this union no longer holds: it can never go out, and it must
                # not hold up the other messages (or the purge that follows).
                unreadable.append(lookup_id)
                continue
            messages.append((lookup_id, report_id, mobile))
        if unreadable:
            log.warning("dropped notifications that cannot be opened", extra={"count": len(unreadable)})
        sent = await asyncio.to_thread(self._announce_all, messages)
        await self._store.delete_notifications([*unreadable, *sent])
        if len(pending) == NOTIFICATION_BATCH:
            self._announce = True  # more are waiting

    def _announce_all(self, messages: list[tuple[str, str, str]]) -> list[str]:
        """Runs in a worker thread (an SMS gateway blocks); the lookups whose message went out."""
        assert self._notifier is not None
        sent = []
        for lookup_id, report_id, mobile in messages:
            try:
                self._notifier.report_ready(mobile)
            except Exception:
                log.exception("notification failed; will retry", extra={"report": report_id})
                continue
            sent.append(lookup_id)
        return sent

    # -- one card action ------------------------------------------------------

    async def _act(self, claim: model.ActionClaim) -> None:
        self._actions_in_flight += 1
        async with self._slots:
            try:
                await self._act_unguarded(claim)
            except StoreUnavailable as error:
                log.warning(
                    "could not record card action", extra={"bank": claim.bank_code, "error": error.detail}
                )
            finally:
                if self._actions_in_flight >= self.policy.max_concurrent_calls:
                    self._room_made()  # card actions had none
                self._actions_in_flight -= 1
                self._events.notify(claim.action_id)
                if claim.closure_id is not None:
                    self._events.notify(claim.closure_id)  # CreateCardClosure waits on the whole closure

    async def _act_unguarded(self, claim: model.ActionClaim) -> None:
        if claim.sealed_identity is None:
            return
        banks = {bank.code: bank for bank in await self._store.list_banks()}
        bank = banks.get(claim.bank_code)
        now = self._clock.now()
        if bank is None:
            final = await self._store.record_action(
                claim.action_id,
                self.owner,
                model.ActionState.FAILED,
                "",
                "the bank no longer participates",
                None,
                now,
            )
            await self._action_final(final)
            return
        opened = self._keys.unseal(claim.sealed_identity, context=f"action:{claim.action_id}")
        remaining = (claim.deadline_time - now).total_seconds()
        timeout = max(0.05, min(self.policy.call_timeout.total_seconds(), remaining))
        call = (
            self._gateway.close_card
            if claim.kind == model.ActionKind.CLOSE
            else self._gateway.report_not_mine
        )
        try:
            # The action id is the bank's idempotency key: a retry after a lost answer is answered the same.
            decision = await call(
                bank, claim.action_id, claim.bank_card_ref, opened["id"], opened["name"], call_timeout=timeout
            )
        except BankCallFailed as failure:
            retry_at = self._retry_time(claim.attempt) if failure.retryable else None
            final = await self._store.record_action(
                claim.action_id,
                self.owner,
                model.ActionState.PENDING if retry_at else model.ActionState.FAILED,
                "",
                failure.reason,
                retry_at,
                self._clock.now(),
            )
            await self._action_final(final, claim.person_hash)
            if retry_at is not None:
                self._due_at(retry_at)
                self._wake.set()
            return
        final = await self._store.record_action(
            claim.action_id,
            self.owner,
            decision.state,
            decision.ticket,
            decision.reason,
            None,
            self._clock.now(),
        )
        await self._action_final(final, claim.person_hash)

    async def _action_final(self, action: model.CardAction | None, person_hash: str | None = None) -> None:
        if action is None:
            return
        self._events.notify(action.id)
        log.info(
            "card action final", extra={"action": action.id, "bank": action.bank_code, "state": action.state}
        )
        if self._audit is not None and person_hash is not None:
            verb = "card.closed" if action.kind == model.ActionKind.CLOSE else "card.frozen"
            outcome = f"{action.bank_code}:{action.state.value}"
            await self._audit.record(person_hash, verb, outcome, f"cardActions/{action.id}")

    def _retry_time(self, attempt: int) -> datetime:
        ceiling = min(
            self.policy.backoff_max.total_seconds(),
            self.policy.backoff_base.total_seconds() * 2 ** (attempt - 1),
        )
        # Full jitter (AWS architecture blog): spreads retries of many lookups over time.
        return self._clock.now() + timedelta(seconds=random.uniform(0, ceiling))  # noqa: S311

    # -- one bank attempt -----------------------------------------------------

    async def _attempt(self, claim: model.Claim) -> None:
        try:
            await self._attempt_unguarded(claim)
        except StoreUnavailable as error:
            # The lease will lapse and the attempt is made again; nothing was half-written.
            log.warning("could not record bank outcome", extra={"bank": claim.bank_code, "error": str(error)})
        finally:
            if self._bank_calls[claim.bank_code] >= self.policy.max_calls_per_bank:
                self._room_made()  # the bank had none
            self._bank_calls[claim.bank_code] -= 1
            self._lookup_calls[claim.lookup_id] -= 1
            if not self._lookup_calls[claim.lookup_id]:
                del self._lookup_calls[claim.lookup_id]
                self._identities.pop(claim.lookup_id, None)
            self._events.notify(claim.lookup_id)

    async def _attempt_unguarded(self, claim: model.Claim) -> None:
        bank = await self._bank(claim.bank_code)
        now = self._clock.now()
        if claim.sealed_identity is None:
            return
        if bank is None or not bank.enabled:
            _, done = await self._store.record_attempt_failed(
                claim.lookup_id, claim.bank_code, self.owner, "bank was disabled", None, now, self._plan
            )
            self._reported(claim.lookup_id, done)
            return
        opened = self._identities.get(claim.lookup_id)
        if opened is None:
            opened = self._keys.unseal(claim.sealed_identity, context=f"lookup:{claim.lookup_id}")
            self._identities[claim.lookup_id] = opened
        remaining = (claim.deadline_time - now).total_seconds()
        timeout = max(0.05, min(self.policy.call_timeout.total_seconds(), remaining))
        started = time.monotonic()
        query_id = f"{claim.lookup_id}-{claim.attempt}"
        try:
            cards = await self._gateway.query_cards(
                bank, query_id, opened["id"], opened["name"], call_timeout=timeout
            )
            check_answer(bank, cards)
        except BankCallFailed as failure:
            await self._record_failure(claim, failure, time.monotonic() - started)
            return
        seconds = time.monotonic() - started
        self._metrics.bank_call(bank.code, "answered", seconds)
        latency_ms = int(seconds * 1000)
        masked = [
            (
                card.bank_card_ref,
                model.MaskedCard(
                    card_ref=self._card_ref(claim.lookup_id, bank.code, card.bank_card_ref),
                    bank_code=bank.code,
                    bank_name=bank.name,
                    card_type=card.card_type,
                    first_four=card.first_four,
                    last_four=card.last_four,
                    number_length=card.number_length,
                    status=card.status,
                    open_time=card.open_time,
                ),
            )
            for card in cards
        ]
        recorded, done = await self._store.record_answer(
            claim.lookup_id, bank.code, self.owner, masked, latency_ms, self._clock.now(), self._plan
        )
        log.info(
            "bank answered",
            extra={
                "lookup": claim.lookup_id,
                "bank": bank.code,
                "cards": len(cards),
                "latency_ms": latency_ms,
                "recorded": recorded,
            },
        )
        self._reported(claim.lookup_id, done)

    def _card_ref(self, lookup_id: str, bank_code: str, bank_card_ref: str) -> str:
        """Report-scoped opaque reference: the bank's own reference never reaches the person."""
        return "c" + self._keys.attribute_hash("card-ref", f"{lookup_id}:{bank_code}:{bank_card_ref}")[:24]

    async def _record_failure(self, claim: model.Claim, failure: BankCallFailed, seconds: float) -> None:
        now = self._clock.now()
        retryable = failure.retryable
        reason = failure.reason
        if failure.truncated and claim.attempt >= self.policy.truncated_answer_attempts:
            retryable = False
            reason = f"{reason}; still truncated on attempt {claim.attempt}"
        retry_at = self._retry_time(claim.attempt) if retryable else None
        self._metrics.bank_call(claim.bank_code, "retried" if retry_at is not None else "failed", seconds)
        log.info(
            "bank attempt failed",
            extra={
                "lookup": claim.lookup_id,
                "bank": claim.bank_code,
                "attempt": claim.attempt,
                "reason": reason,
                "retry": retry_at is not None,
            },
        )
        _, done = await self._store.record_attempt_failed(
            claim.lookup_id, claim.bank_code, self.owner, reason, retry_at, now, self._plan
        )
        self._reported(claim.lookup_id, done)
        if retry_at is not None:
            self._due_at(retry_at)
            self._wake.set()

    async def _finalize(self, lookup_id: str, force: bool) -> None:
        done = await self._store.finalize_lookup(lookup_id, self._plan, self._clock.now(), force)
        self._reported(lookup_id, done)

    def _reported(self, lookup_id: str, done: bool) -> None:
        if done:
            log.info("report ready", extra={"lookup": lookup_id})
            self._metrics.report_generated(lookup_id)
            self._events.notify(lookup_id, final=True)
            self._announce = True  # the notification outbox has a new row
            if not self._announce_due:
                # One wake-up per announcement batch, not per report.
                self._announce_due = True
                self._wake.set()

    async def _bank(self, code: str) -> model.Bank | None:
        if code not in self._banks:
            self._banks = {bank.code: bank for bank in await self._store.list_banks()}
        return self._banks.get(code)
