"""CardActionStore: closures and flags, carried out like bank tasks; the sealed identity is
erased once an action is final, and final actions are purged after their retention."""

from __future__ import annotations

from datetime import timedelta

import pytest

from server.union.domain import model
from server.union.domain.ports import DuplicateRequest, RequestMismatch
from server.union.storage.database import Store
from tests.union.storage_contract.conftest import LEASE, NOW, OWNER, PERSON, STRANGER, card, new_lookup, plan

DEADLINE = NOW + timedelta(days=1)


async def _sources(store: Store) -> list[model.ReportCardSource]:
    icbc = next(b for b in await store.list_banks() if b.code == "ICBC")
    await new_lookup(store, "l1", [icbc])
    cards = [(f"bank-{n}", card(f"c{n}", icbc, f"{n:04d}")) for n in range(3)]
    await store.record_answer("l1", "ICBC", OWNER, cards, 2, NOW, plan("r1"))
    sources = await store.report_card_sources("r1", PERSON, NOW)
    assert sources is not None
    return sorted(sources.values(), key=lambda s: s.card_ref)


async def test_a_closure_has_one_pending_action_per_card(store: Store) -> None:
    first, second, _ = await _sources(store)
    items = [("a1", first, "sealed-1"), ("a2", second, "sealed-2")]
    closure = await store.create_card_closure("k1", PERSON, "req", "fp", "r1", items, NOW, DEADLINE)
    assert [(i.id, i.card_ref, i.state) for i in closure.items] == [
        ("a1", "c0", model.ActionState.PENDING),
        ("a2", "c1", model.ActionState.PENDING),
    ]
    assert await store.get_card_closure("k1", PERSON) == closure
    assert await store.get_card_closure("k1", STRANGER) is None
    assert await store.find_closure_by_request(PERSON, "req", "fp") == closure
    with pytest.raises(RequestMismatch):
        await store.find_closure_by_request(PERSON, "req", "another")
    with pytest.raises(DuplicateRequest):
        await store.create_card_closure("k2", PERSON, "req", "fp", "r1", items[:1], NOW, DEADLINE)
    assert [c.id for c in await store.list_card_closures(PERSON, None, 10)] == ["k1"]
    report = await store.get_report("r1", PERSON, NOW)
    assert report is not None
    assert {c.card_ref: c.closure.id if c.closure else None for c in report.cards} == {
        "c0": "a1",
        "c1": "a2",
        "c2": None,
    }


async def test_a_card_is_flagged_once(store: Store) -> None:
    first, second, _ = await _sources(store)
    flag, created = await store.create_flag("f1", PERSON, "req-f", "fp", first, "sealed", NOW, DEADLINE)
    assert created
    assert flag.kind == model.ActionKind.FLAG
    again, created = await store.create_flag("f2", PERSON, "req-f2", "fp2", first, "sealed", NOW, DEADLINE)
    assert (again, created) == (flag, False)  # the card's flag, whoever asks again
    retried, created = await store.create_flag("f3", PERSON, "req-f", "fp", first, "sealed", NOW, DEADLINE)
    assert (retried, created) == (flag, False)
    with pytest.raises(RequestMismatch):
        await store.create_flag("f4", PERSON, "req-f", "other", second, "sealed", NOW, DEADLINE)
    assert await store.get_card_action("f1") == flag


async def test_actions_are_claimed_answered_once_and_then_hold_no_identity(store: Store) -> None:
    first, second, _ = await _sources(store)
    items = [("a1", first, "s1"), ("a2", second, "s2")]
    await store.create_card_closure("k1", PERSON, "req", "fp", "r1", items, NOW, DEADLINE)
    claims = await store.claim_due_actions(OWNER, NOW, LEASE, 10)
    assert sorted((c.action_id, c.attempt, c.sealed_identity) for c in claims) == [
        ("a1", 1, "s1"),
        ("a2", 1, "s2"),
    ]
    assert await store.claim_due_actions("replica-2", NOW, LEASE, 10) == []
    assert await store.record_action("a1", "replica-2", model.ActionState.CLOSED, "t", "", None, NOW) is None
    retry = NOW + timedelta(seconds=5)
    assert await store.record_action("a2", OWNER, model.ActionState.PENDING, "", "busy", retry, NOW) is None
    done = await store.record_action("a1", OWNER, model.ActionState.CLOSED, "ticket-1", "", None, NOW)
    assert done is not None
    assert (done.state, done.ticket) == (model.ActionState.CLOSED, "ticket-1")
    [again] = await store.claim_due_actions(OWNER, retry, LEASE, 10)
    assert (again.action_id, again.attempt, again.sealed_identity) == ("a2", 2, "s2")
    overdue = await store.fail_overdue_actions(DEADLINE)
    assert [(a.id, a.state) for a in overdue] == [("a2", model.ActionState.FAILED)]
    assert await store.claim_due_actions(OWNER, DEADLINE, LEASE, 10) == []
    assert await store.purge_card_actions(NOW) == 0  # final since NOW and DEADLINE: kept until then
    assert await store.purge_card_actions(DEADLINE) == 1
    assert await store.get_card_closure("k1", PERSON) is not None  # one item left
    assert await store.purge_card_actions(DEADLINE + timedelta(seconds=1)) == 1
    assert await store.get_card_closure("k1", PERSON) is None  # gone with its last item
