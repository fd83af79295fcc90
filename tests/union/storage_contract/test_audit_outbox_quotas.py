"""AuditStore, NotificationStore, QuotaStore and StatsStore, with their purges."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from server.union.domain import model
from server.union.storage.database import Store
from tests.union.storage_contract.conftest import NOW, OWNER, new_lookup, plan


async def test_the_audit_trail_lists_newest_first_by_actor_and_time(store: Store) -> None:
    for minute, actor in enumerate(["a", "b", "a"]):
        await store.add_audit_event(
            NOW + timedelta(minutes=minute), actor, "lookup.get", "ok", f"lookups/l{minute}"
        )
    everything = await store.list_audit_events(None, None, None, None, 10)
    assert [(e.actor, e.resource) for e in everything] == [
        ("a", "lookups/l2"),
        ("b", "lookups/l1"),
        ("a", "lookups/l0"),
    ]
    assert [e.resource for e in await store.list_audit_events("a", None, None, None, 10)] == [
        "lookups/l2",
        "lookups/l0",
    ]
    window = await store.list_audit_events(
        None, NOW + timedelta(minutes=1), NOW + timedelta(minutes=2), None, 10
    )
    assert [e.resource for e in window] == ["lookups/l1"]
    last = everything[0]
    page = await store.list_audit_events(None, None, None, (last.time, last.id), 10)
    assert [e.resource for e in page] == ["lookups/l1", "lookups/l0"]
    assert await store.purge_audit_events(NOW + timedelta(minutes=1)) == 1
    assert len(await store.list_audit_events(None, None, None, None, 10)) == 2


async def test_the_outbox_holds_each_report_ready_message_until_sent(store: Store) -> None:
    icbc = next(b for b in await store.list_banks() if b.code == "ICBC")
    for lookup_id in ("l1", "l2"):
        await new_lookup(store, lookup_id, [icbc])
        await store.record_answer(lookup_id, "ICBC", OWNER, [], 1, NOW, plan(f"r-{lookup_id}"))
    assert sorted(await store.pending_notifications()) == [
        ("l1", "r-l1", "sealed-contact"),
        ("l2", "r-l2", "sealed-contact"),
    ]
    assert await store.delete_notifications(["l1"]) == 1
    assert await store.delete_notifications([]) == 0
    assert await store.pending_notifications() == [("l2", "r-l2", "sealed-contact")]
    assert await store.purge_notifications(NOW) == 0
    assert await store.purge_notifications(NOW + timedelta(seconds=1)) == 1
    assert await store.pending_notifications() == []


async def test_a_quota_is_one_exact_decision_under_a_burst(store: Store) -> None:
    window = timedelta(hours=1)
    taken = await asyncio.gather(*(store.take_quota_slot("k", 3, window, NOW) for _ in range(8)))
    assert taken.count(None) == 3  # exactly the limit, however the burst interleaves
    assert all(wait == window for wait in taken if wait is not None)
    later = NOW + timedelta(minutes=20)
    assert await store.take_quota_slot("k", 3, window, later) == timedelta(minutes=40)
    assert await store.take_quota_slot("other", 3, window, later) is None  # keys apart
    assert await store.take_quota_slot("k", 3, window, NOW + window) is None  # a slot fell out
    assert await store.purge_quota_slots(NOW + timedelta(seconds=1)) == 2  # the two still from NOW
    assert await store.take_quota_slot("k", 3, window, NOW + window) is None


async def test_statistics_count_per_bank(store: Store) -> None:
    icbc, cmb = [b for b in await store.list_banks() if b.code in ("ICBC", "CMB")]
    await new_lookup(store, "l1", [icbc, cmb])
    await store.record_answer("l1", "ICBC", OWNER, [], 10, NOW, plan("r1"))
    await store.record_attempt_failed("l1", "CMB", OWNER, "down", None, NOW, plan("r1"))
    stats = await store.stats()
    assert (stats.lookups_created, stats.reports_generated, stats.people_verified) == (1, 1, 0)
    assert [(b.bank_code, b.answered, b.failed, b.mean_latency_ms) for b in stats.banks] == [
        ("ICBC", 1, 0, 10.0),
        ("CMB", 0, 1, 0.0),
    ]
    totals = await store.monitoring_totals(NOW)
    assert (totals.lookups_created, totals.reports_generated, totals.lookups_overdue) == (1, 1, 0)
    assert totals.bank_tasks_waiting == {}
    assert isinstance(stats, model.ServiceStats)
