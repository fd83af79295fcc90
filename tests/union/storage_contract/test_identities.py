"""IdentityStore: the registry as keyed hashes, and verifications that hold a sealed identity
only until they are used, locked or expired."""

from __future__ import annotations

from datetime import timedelta

from server.union.domain import model
from server.union.domain.ports import IdentityStore
from server.union.storage.database import Store
from tests.union.storage_contract.conftest import NOW, PERSON


def _verification(verification_id: str, expire_in: timedelta = timedelta(minutes=5)) -> model.NewVerification:
    return model.NewVerification(
        id=verification_id,
        person_hash=PERSON,
        region_code="310000",
        sealed_identity="sealed",
        code_hash="c" * 64,
        create_time=NOW,
        expire_time=NOW + expire_in,
    )


async def test_the_registry_keeps_the_first_entry_of_each_person(store: IdentityStore) -> None:
    await store.add_identities([(PERSON, "n1", "m1", "310000"), ("q" * 64, "n2", "m2", "530000")])
    await store.add_identities([(PERSON, "other", "other", "110000")])  # a known person: skipped
    assert await store.identity_count() == 2
    assert await store.find_identity(PERSON) == model.RegisteredIdentity(PERSON, "n1", "m1", "310000")
    assert await store.find_identity("x" * 64) is None


async def test_a_verification_is_read_back_as_stored(store: IdentityStore) -> None:
    await store.add_verification(_verification("v1"))
    found = await store.get_verification("v1")
    assert found == model.Verification(
        id="v1",
        person_hash=PERSON,
        region_code="310000",
        sealed_identity="sealed",
        code_hash="c" * 64,
        failed_attempts=0,
        completed=False,
        create_time=NOW,
        expire_time=NOW + timedelta(minutes=5),
    )
    assert await store.get_verification("v-missing") is None


async def test_wrong_codes_count_down_and_erase_the_identity_at_the_limit(store: IdentityStore) -> None:
    await store.add_verification(_verification("v1"))
    assert await store.fail_verification_attempt("v1", max_attempts=3) == 2
    assert await store.fail_verification_attempt("v1", max_attempts=3) == 1
    assert await store.fail_verification_attempt("v1", max_attempts=3) == 0
    locked = await store.get_verification("v1")
    assert locked is not None
    assert locked.failed_attempts == 3
    assert locked.sealed_identity is None
    assert await store.complete_verification("v1", NOW) is None
    assert await store.fail_verification_attempt("v-missing", max_attempts=3) == 0


async def test_a_verification_completes_once_and_counts_its_person_once(store: Store) -> None:
    await store.add_verification(_verification("v1"))
    await store.add_verification(_verification("v2"))
    assert await store.complete_verification("v1", NOW) == "sealed"
    assert await store.complete_verification("v1", NOW) is None  # used
    used = await store.get_verification("v1")
    assert used is not None
    assert used.completed
    assert used.sealed_identity is None
    assert await store.complete_verification("v2", NOW) == "sealed"  # the same person again
    assert (await store.stats()).people_verified == 1


async def test_expired_verifications_keep_no_identity_and_are_purged(store: Store) -> None:
    await store.add_verification(_verification("v-old", expire_in=timedelta(minutes=-1)))
    await store.add_verification(_verification("v-live"))
    assert await store.erase_stale_verifications(NOW) == 1
    old = await store.get_verification("v-old")
    assert old is not None
    assert old.sealed_identity is None
    live = await store.get_verification("v-live")
    assert live is not None
    assert live.sealed_identity == "sealed"
    assert await store.purge_verifications(NOW + timedelta(seconds=1)) == 2
    assert await store.get_verification("v-live") is None
