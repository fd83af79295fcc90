"""SessionRegistry and AdminCredentialStore (server.union.storage.credentials), on each backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from server.union.domain.ports import AdminCredential, AdminRole, DuplicateCredentialName
from server.union.keyring import Keys
from server.union.storage.credentials import AdminCredentialRepository, SessionStore
from server.union.storage.database import Store

NOW = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
ZHANG = "a" * 64
LI = "b" * 64


async def test_one_live_session_per_person(store: Store) -> None:
    sessions = SessionStore(store)
    assert await sessions.live_session(ZHANG) is None
    await sessions.start_session(ZHANG, "t1", NOW + timedelta(minutes=30))
    await sessions.start_session(LI, "t2", NOW + timedelta(minutes=30))
    assert await sessions.live_session(ZHANG) == "t1"
    # A new session replaces (revokes) the older one.
    await sessions.start_session(ZHANG, "t3", NOW + timedelta(minutes=40))
    assert await sessions.live_session(ZHANG) == "t3"
    # Ending a session that is not the live one changes nothing.
    assert not await sessions.end_session(ZHANG, "t1")
    assert await sessions.live_session(ZHANG) == "t3"
    assert await sessions.end_session(ZHANG, "t3")
    assert await sessions.live_session(ZHANG) is None
    assert not await sessions.end_session(ZHANG, "t3")
    assert await sessions.live_session(LI) == "t2"


async def test_sessions_are_purged_when_they_would_have_expired(store: Store) -> None:
    sessions = SessionStore(store)
    await sessions.start_session(ZHANG, "t1", NOW + timedelta(minutes=30))
    await sessions.start_session(LI, "t2", NOW + timedelta(minutes=40))
    await sessions.end_session(ZHANG, "t1")
    assert await sessions.purge_expired_sessions(NOW + timedelta(minutes=29)) == 0
    assert await sessions.purge_expired_sessions(NOW + timedelta(minutes=30)) == 1
    assert await sessions.live_session(LI) == "t2"
    assert await sessions.purge_expired_sessions(NOW + timedelta(hours=1), limit=10) == 1
    assert await sessions.purge_expired_sessions(NOW + timedelta(hours=1)) == 0


async def test_concurrent_verifications_leave_exactly_one_live_session(store: Store) -> None:
    sessions = SessionStore(store)
    tokens = [f"t{i}" for i in range(20)]
    await asyncio.gather(*(sessions.start_session(ZHANG, t, NOW + timedelta(minutes=30)) for t in tokens))
    assert await sessions.live_session(ZHANG) in tokens


async def test_admin_credentials_are_found_by_a_hash_under_any_key(store: Store) -> None:
    credentials = AdminCredentialRepository(store)
    old = Keys([bytes(range(32))])
    rotated = Keys([bytes(range(32)), bytes(range(1, 33))])
    alice = AdminCredential("c" + "1" * 16, "alice", AdminRole.VIEWER, NOW)
    await credentials.add_credential(alice, *old.credential_hash("alice-token"))
    assert await credentials.find_credential(old.credential_hashes("alice-token")) == alice
    # Hashed under the older key, still found after a rotation.
    assert await credentials.find_credential(rotated.credential_hashes("alice-token")) == alice
    assert await credentials.find_credential(rotated.credential_hashes("alice-token ")) is None
    # The right hash under the wrong key id is not a match.
    _, under_old = old.credential_hash("alice-token")
    assert await credentials.find_credential({rotated.current.id: under_old}) is None

    with pytest.raises(DuplicateCredentialName):
        await credentials.add_credential(
            AdminCredential("c" + "2" * 16, "alice", AdminRole.OPERATOR, NOW),
            *old.credential_hash("other-token"),
        )
    assert await credentials.list_credentials() == [alice]
    assert await credentials.delete_credential("alice") == alice
    assert await credentials.delete_credential("alice") is None
    assert await credentials.find_credential(old.credential_hashes("alice-token")) is None


async def test_the_bootstrap_credential_is_set_once_and_follows_its_token(store: Store) -> None:
    credentials = AdminCredentialRepository(store)
    keys = Keys([bytes(range(32))])
    first, changed = await credentials.set_credential(
        "bootstrap", AdminRole.OPERATOR, *keys.credential_hash("one"), NOW, "c" + "a" * 16
    )
    assert changed
    again, changed = await credentials.set_credential(
        "bootstrap", AdminRole.OPERATOR, *keys.credential_hash("one"), NOW, "c" + "b" * 16
    )
    assert (again, changed) == (first, False)
    moved, changed = await credentials.set_credential(
        "bootstrap", AdminRole.OPERATOR, *keys.credential_hash("two"), NOW, "c" + "c" * 16
    )
    assert changed
    assert moved.id == first.id
    assert await credentials.find_credential(keys.credential_hashes("one")) is None
    assert await credentials.find_credential(keys.credential_hashes("two")) == first


async def test_replicas_starting_together_make_one_bootstrap_credential(store: Store) -> None:
    credentials = AdminCredentialRepository(store)
    keys = Keys([bytes(range(32))])
    made = await asyncio.gather(
        *(
            credentials.set_credential(
                "bootstrap", AdminRole.OPERATOR, *keys.credential_hash("one"), NOW, f"c{i:016x}"
            )
            for i in range(8)
        )
    )
    assert len({credential.id for credential, _ in made}) == 1
    assert len(await credentials.list_credentials()) == 1
