"""CatalogueStore: banks and regions, seeded once, changed only by operators."""

from __future__ import annotations

from datetime import timedelta

from server.population.catalogue import BANKS, REGIONS
from server.union.domain.ports import CatalogueStore
from tests.union.storage_contract.conftest import NOW


async def test_seeding_fills_the_catalogue_in_its_order(store: CatalogueStore) -> None:
    banks = await store.list_banks()
    assert [b.code for b in banks] == [b.code for b in BANKS]
    assert [b.position for b in banks] == list(range(len(BANKS)))
    assert all(b.enabled for b in banks)
    regions = {r.code: r for r in await store.list_regions()}
    assert set(regions) == {r.code for r in REGIONS}
    for info in REGIONS:
        assert regions[info.code].open == (info.pilot_open_date is not None)
        assert (regions[info.code].open_time == NOW) == regions[info.code].open


async def test_seeding_again_never_overwrites_an_operators_change(store: CatalogueStore) -> None:
    await store.update_bank("CMB", enabled=False, address="cmb.example:443")
    await store.update_region("310000", False, NOW)
    await store.seed_catalogue(BANKS, {"CMB": "elsewhere:1"}, REGIONS, NOW + timedelta(days=1))
    cmb = next(b for b in await store.list_banks() if b.code == "CMB")
    assert (cmb.enabled, cmb.address) == (False, "cmb.example:443")
    shanghai = await store.get_region("310000")
    assert shanghai is not None
    assert not shanghai.open
    assert shanghai.open_time is None


async def test_an_update_changes_only_what_it_names(store: CatalogueStore) -> None:
    changed = await store.update_bank("ICBC", enabled=None, address="icbc:1")
    assert changed is not None
    assert changed.enabled
    assert changed.address == "icbc:1"
    changed = await store.update_bank("ICBC", enabled=False, address=None)
    assert changed is not None
    assert not changed.enabled
    assert changed.address == "icbc:1"
    assert await store.update_bank("NOPE", enabled=True, address=None) is None
    # This store's own changes are read back at once, not after the catalogue's cache lapses.
    icbc = next(b for b in await store.list_banks() if b.code == "ICBC")
    assert (icbc.enabled, icbc.address) == (False, "icbc:1")


async def test_opening_a_region_records_when(store: CatalogueStore) -> None:
    later = NOW + timedelta(hours=3)
    opened = await store.update_region("440000", True, later)
    assert opened is not None
    assert opened.open
    assert opened.open_time == later
    again = await store.update_region("440000", True, later + timedelta(hours=1))
    assert again is not None
    assert again.open_time == later
    closed = await store.update_region("440000", False, later)
    assert closed is not None
    assert not closed.open
    assert closed.open_time is None
    assert await store.update_region("999999", True, later) is None
    assert await store.get_region("999999") is None


async def test_new_addresses_point_banks_elsewhere(store: CatalogueStore) -> None:
    await store.set_bank_addresses({"ABC": "127.0.0.1:5001", "BOC": "127.0.0.1:5002"})
    addresses = {b.code: b.address for b in await store.list_banks()}
    assert (addresses["ABC"], addresses["BOC"]) == ("127.0.0.1:5001", "127.0.0.1:5002")
