"""ReportStore and the report's retention: a report is its owner's until it expires, then it is
never served and its purge takes everything its lookup kept."""

from __future__ import annotations

from datetime import timedelta

from server.union.domain import model
from server.union.storage.database import Store
from tests.union.storage_contract.conftest import NOW, OWNER, PERSON, STRANGER, card, new_lookup, plan

EXPIRE = NOW + timedelta(days=7)
COOLDOWN = timedelta(days=7)


async def _reported(store: Store, lookup_id: str, report_id: str, person: str = PERSON) -> None:
    icbc = next(b for b in await store.list_banks() if b.code == "ICBC")
    await new_lookup(store, lookup_id, [icbc], person=person)
    cards = [(f"bank-{lookup_id}", card(f"c-{lookup_id}", icbc, "1234"))]
    assert await store.record_answer(lookup_id, "ICBC", OWNER, cards, 2, NOW, plan(report_id, EXPIRE)) == (
        True,
        True,
    )


async def test_a_report_is_served_to_its_owner_until_it_expires(store: Store) -> None:
    await _reported(store, "l1", "r1")
    report = await store.get_report("r1", PERSON, NOW)
    assert report is not None
    assert report.lookup_id == "l1"
    assert report.expire_time == EXPIRE
    assert [c.card_ref for c in report.cards] == ["c-l1"]
    assert await store.get_report("r1", STRANGER, NOW) is None
    assert await store.get_report("r1", PERSON, EXPIRE) is None
    assert await store.get_report("missing", PERSON, NOW) is None


async def test_reports_are_listed_newest_first_by_page(store: Store) -> None:
    await _reported(store, "l1", "r1")
    await _reported(store, "l2", "r2")
    await _reported(store, "l3", "r3", person=STRANGER)
    assert [r.id for r in await store.list_reports(PERSON, NOW, None, 10)] == ["r2", "r1"]
    assert [r.id for r in await store.list_reports(PERSON, NOW, None, 1)] == ["r2"]
    assert [r.id for r in await store.list_reports(PERSON, NOW, (NOW, "r2"), 10)] == ["r1"]
    assert await store.list_reports(PERSON, EXPIRE, None, 10) == []


async def test_the_card_sources_name_the_banks_reference(store: Store) -> None:
    await _reported(store, "l1", "r1")
    sources = await store.report_card_sources("r1", PERSON, NOW)
    assert sources is not None
    assert [(s.lookup_id, s.bank_code, s.bank_card_ref, s.last_four) for s in sources.values()] == [
        ("l1", "ICBC", "bank-l1", "1234")
    ]
    assert await store.report_card_sources("r1", STRANGER, NOW) is None
    assert await store.report_card_sources("r1", PERSON, EXPIRE) is None


async def test_deleting_a_report_takes_its_lookup_with_it(store: Store) -> None:
    await _reported(store, "l1", "r1")
    assert not await store.delete_report("r1", STRANGER, NOW, COOLDOWN)
    assert await store.delete_report("r1", PERSON, NOW, COOLDOWN)
    assert not await store.delete_report("r1", PERSON, NOW, COOLDOWN)
    assert await store.get_report("r1", PERSON, NOW) is None
    assert await store.get_lookup("l1", None) is None
    assert await store.pending_notifications() == []


async def test_a_deleted_reports_banks_keep_the_requery_cooldown_until_it_ends(store: Store) -> None:
    """What the cooldown needs outlives the deleted lookup: the bank that answered, and when."""
    await _reported(store, "l1", "r1")
    assert await store.delete_report("r1", PERSON, NOW, COOLDOWN)
    icbc = next(b for b in await store.list_banks() if b.code == "ICBC")
    seen: list[dict[str, object]] = []

    def admit(activity: model.PersonActivity) -> None:
        seen.append(dict(activity.answered_banks))

    await new_lookup(store, "l2", [icbc], admit=admit)
    assert list(seen[0]) == ["ICBC"]
    assert await store.purge_bank_cooldowns(NOW + COOLDOWN - timedelta(seconds=1)) == 0
    assert await store.purge_bank_cooldowns(NOW + COOLDOWN + timedelta(seconds=1)) == 1


async def test_the_purge_removes_expired_reports_for_good(store: Store) -> None:
    await _reported(store, "l1", "r1")
    await _reported(store, "l2", "r2")
    assert await store.purge_expired_reports(NOW) == 0
    assert await store.purge_expired_reports(EXPIRE, limit=1) == 1
    assert await store.purge_expired_reports(EXPIRE) == 1
    for lookup_id in ("l1", "l2"):
        assert await store.get_lookup(lookup_id, None) is None
    assert await store.list_reports(PERSON, NOW, None, 10) == []
