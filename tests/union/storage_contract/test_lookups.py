"""LookupStore: a lookup and its bank tasks, the work queue, answers recorded once by the lease
holder, and the one report written when the last bank is final."""

from __future__ import annotations

from datetime import timedelta

import pytest

from server.union.domain import model
from server.union.domain.ports import DuplicateRequest, RequestMismatch
from server.union.storage.database import Store
from tests.union.storage_contract.conftest import (
    DEADLINE,
    LEASE,
    NOW,
    OWNER,
    PERSON,
    STRANGER,
    card,
    new_lookup,
    plan,
)


async def _banks(store: Store, *codes: str) -> list[model.Bank]:
    return [b for b in await store.list_banks() if b.code in codes]


async def test_a_lookup_is_created_with_one_pending_task_per_bank(store: Store) -> None:
    banks = await _banks(store, "ICBC", "CMB")
    lookup, claims, created = await new_lookup(store, "l1", banks)
    assert created
    assert lookup.state == model.LookupState.RUNNING
    assert [(b.bank_code, b.outcome, b.attempt_count) for b in lookup.banks] == [
        ("ICBC", model.BankOutcome.PENDING, 1),
        ("CMB", model.BankOutcome.PENDING, 1),
    ]
    assert sorted((c.bank_code, c.attempt, c.sealed_identity) for c in claims) == [
        ("CMB", 1, "sealed-identity"),
        ("ICBC", 1, "sealed-identity"),
    ]
    assert await store.get_lookup("l1", PERSON) == lookup
    assert await store.get_lookup("l1", None) == lookup
    assert await store.get_lookup("l1", STRANGER) is None  # someone else's is not found
    assert await store.get_lookup("missing", PERSON) is None
    assert (await store.stats()).lookups_created == 1


async def test_a_request_id_makes_one_lookup(store: Store) -> None:
    banks = await _banks(store, "ICBC")
    first, _, _ = await new_lookup(store, "l1", banks, request_id="r")
    again, claims, created = await new_lookup(store, "l1", banks, request_id="r")
    assert (again, claims, created) == (first, [], False)
    assert await store.find_lookup_by_request(PERSON, "r", "fp-l1") == first
    with pytest.raises(RequestMismatch):
        await store.find_lookup_by_request(PERSON, "r", "another request")
    with pytest.raises(RequestMismatch):
        await new_lookup(store, "l2", banks, request_id="r")  # fingerprint fp-l2: another request
    assert await store.find_lookup_by_request(PERSON, "unused", "fp") is None


async def test_a_refused_admission_writes_nothing(store: Store) -> None:
    seen: list[model.PersonActivity] = []

    def refuse(activity: model.PersonActivity) -> None:
        seen.append(activity)
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError):
        await store.create_lookup(
            "l1", PERSON, "r", "fp", "310000", "sealed", None, await _banks(store, "ICBC"), NOW, DEADLINE,
            admit=refuse,
        )  # fmt: skip
    assert seen == [model.PersonActivity(running=False)]
    assert await store.get_lookup("l1", None) is None


async def test_a_racing_retry_is_a_duplicate_request(store: Store) -> None:
    banks = await _banks(store, "ICBC")
    await new_lookup(store, "l1", banks, request_id="r")
    with pytest.raises(DuplicateRequest):
        # The same id again (another replica's insert won the race): refused, not a second lookup.
        await new_lookup(store, "l1", banks, request_id="r2")


async def test_answers_are_recorded_once_and_the_last_one_writes_the_report(store: Store) -> None:
    icbc, cmb = await _banks(store, "ICBC", "CMB")
    await new_lookup(store, "l1", [icbc, cmb])
    cards = [("bank-ref-1", card("c1", icbc, "1111")), ("bank-ref-2", card("c2", icbc, "2222", debit=False))]
    assert await store.record_answer("l1", "ICBC", "another-replica", cards, 5, NOW, plan("r1")) == (
        False,
        False,
    )
    assert await store.record_answer("l1", "ICBC", OWNER, cards, 5, NOW, plan("r1")) == (True, False)
    assert await store.record_answer("l1", "ICBC", OWNER, cards, 5, NOW, plan("r1")) == (False, False)
    assert await store.record_answer("l1", "CMB", OWNER, [], 7, NOW, plan("r1")) == (True, True)
    lookup = await store.get_lookup("l1", PERSON)
    assert lookup is not None
    assert lookup.state == model.LookupState.COMPLETED
    assert lookup.report_id == "r1"
    progress = {b.bank_code: (b.outcome, b.card_count, b.debit_count, b.credit_count) for b in lookup.banks}
    assert progress == {
        "ICBC": (model.BankOutcome.ANSWERED, 2, 1, 1),
        "CMB": (model.BankOutcome.ANSWERED, 0, 0, 0),
    }
    report = await store.get_report("r1", PERSON, NOW)
    assert report is not None
    assert [c for c in report.cards] == [c for _, c in cards]
    assert await store.pending_notifications() == [("l1", "r1", "sealed-contact")]
    assert (await store.stats()).reports_generated == 1


async def test_a_failed_attempt_is_retried_or_gives_the_bank_up(store: Store) -> None:
    icbc, cmb = await _banks(store, "ICBC", "CMB")
    await new_lookup(store, "l1", [icbc, cmb])
    retry = NOW + timedelta(seconds=10)
    assert await store.record_attempt_failed("l1", "ICBC", OWNER, "timeout", retry, NOW, plan("r1")) == (
        True,
        False,
    )
    assert await store.next_due_time() == retry  # before CMB's lease lapses
    # Due again at `retry`: claimed with its next attempt number.
    [claim] = await store.claim_due_tasks(OWNER, retry, LEASE, 10)
    assert (claim.bank_code, claim.attempt) == ("ICBC", 2)
    assert await store.record_attempt_failed("l1", "ICBC", OWNER, "refused", None, retry, plan("r1")) == (
        True,
        False,
    )
    assert await store.record_answer("l1", "CMB", OWNER, [], 3, retry, plan("r1")) == (True, True)
    report = await store.get_report("r1", PERSON, retry)
    assert report is not None
    assert {b.bank_code: (b.outcome, b.failure_reason) for b in report.banks} == {
        "ICBC": (model.BankOutcome.FAILED, "refused"),
        "CMB": (model.BankOutcome.ANSWERED, ""),
    }


async def test_claims_lease_due_tasks_to_one_owner_at_a_time(store: Store) -> None:
    banks = await _banks(store, "ICBC", "CMB", "BOC")
    await new_lookup(store, "l1", banks, claim=False)
    first = await store.claim_due_tasks(OWNER, NOW, LEASE, 10, skip_banks=["BOC"])
    assert sorted(c.bank_code for c in first) == ["CMB", "ICBC"]
    second = await store.claim_due_tasks("replica-2", NOW, LEASE, 10)
    assert [c.bank_code for c in second] == ["BOC"]  # the others are leased
    assert await store.claim_due_tasks("replica-2", NOW, LEASE, 10) == []
    assert await store.release_leases(OWNER) == 2  # a graceful stop hands them back
    again = await store.claim_due_tasks("replica-2", NOW, LEASE, 10)
    assert sorted((c.bank_code, c.attempt) for c in again) == [("CMB", 2), ("ICBC", 2)]
    # A lease that lapses makes the task claimable by anyone.
    lapsed = await store.claim_due_tasks(OWNER, NOW + LEASE + timedelta(seconds=1), LEASE, 10)
    assert len(lapsed) == 3


async def test_the_deadline_finalises_with_silent_banks_marked(store: Store) -> None:
    icbc, cmb = await _banks(store, "ICBC", "CMB")
    await new_lookup(store, "l1", [icbc, cmb])
    await store.record_answer("l1", "ICBC", OWNER, [], 3, NOW, plan("r1"))
    assert await store.finalize_lookup("l1", plan("r1"), NOW, force=False) is False  # CMB pending
    assert await store.lookups_past_deadline(DEADLINE, 10) == ["l1"]
    assert await store.finalize_lookup("l1", plan("r1"), DEADLINE, force=True) is True
    assert await store.finalize_lookup("l1", plan("r2"), DEADLINE, force=True) is False  # once
    lookup = await store.get_lookup("l1", PERSON)
    assert lookup is not None
    assert lookup.report_id == "r1"
    silent = next(b for b in lookup.banks if b.bank_code == "CMB")
    assert (silent.outcome, silent.failure_reason) == (
        model.BankOutcome.NO_RESPONSE,
        "no answer before the deadline",
    )
    assert await store.lookups_past_deadline(DEADLINE, 10) == []
    assert await store.running_lookups_without_pending_tasks(10) == []


async def test_a_person_lists_their_running_and_reported_lookups(store: Store) -> None:
    banks = await _banks(store, "ICBC")
    await new_lookup(store, "l1", banks)
    await new_lookup(store, "l2", banks)
    await new_lookup(store, "l3", banks, person=STRANGER)
    await store.record_answer("l2", "ICBC", OWNER, [], 1, NOW, plan("r2"))
    listed = await store.list_lookups(PERSON, NOW, None, 10)
    assert [lookup.id for lookup in listed] == ["l2", "l1"]  # newest first; same time: by id
    page = await store.list_lookups(PERSON, NOW, (NOW, "l2"), 10)
    assert [lookup.id for lookup in page] == ["l1"]
    # Once its report has expired, a lookup is gone for its owner as the report is.
    assert [lookup.id for lookup in await store.list_lookups(PERSON, NOW + timedelta(days=8), None, 10)] == [
        "l1"
    ]
