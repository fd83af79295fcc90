"""Session credentials: unreadable sealed identities, key rotation, revocation (sign-out and
re-verification) and the sessions table's retention. Issue 18, item 8 a-c."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cardlookup.v1 import identity_service_pb2 as identity_pb
from sqlalchemy import func, insert, select, text
from typer.testing import CliRunner

from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError
from server.bank.bank_server import RunningBank
from server.bank.faults import FaultSettings
from server.union.__main__ import app as union_app
from server.union.clock import FakeClock
from server.union.domain.retention import RetentionPolicy
from server.union.keyring import Keys
from server.union.notify import report_ready_text
from server.union.storage.models import NotificationRow
from server.union.union_server import UnionServer
from tests.conftest import LI, ZHANG, UnionFactory, run_lookup, verified_client


async def _refusal(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except CardLookupError as error:
        return error.code, error.reason
    return grpc.StatusCode.OK, ""


def _resigned(union: UnionServer, token: str, **changes: object) -> str:
    """The same session with some claims changed, validly signed by this union's current key."""
    claims = union.keys.verify(Keys.session, token)
    claims.update(changes)
    return union.keys.sign(Keys.session, claims)


async def test_a_session_whose_sealed_identity_cannot_be_opened_is_unauthenticated(
    union: UnionServer,
) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
        token = client.session_token
        assert token is not None
        claims = union.keys.verify(Keys.session, token)
        sealed_for_another_session = union.keys.seal({"name": "x", "id": "y"}, context="session:other")
        unreadable = [
            "not-sealed-at-all",  # no key id: read as the first key's, and it is no ciphertext
            "deadbeef." + claims["pii"].split(".", 1)[1],  # a key this union does not hold
            claims["pii"][:-4] + "AAAA",  # tampered with
            sealed_for_another_session,  # bound to another session
            union.keys.seal({"only": "this"}, context=f"session:{claims['jti']}"),  # no identity in it
        ]
        for pii in unreadable:
            client.session_token = _resigned(union, token, pii=pii)
            calls = (
                client.create_lookup(consent_terms_version=TERMS_VERSION),
                client.close_cards(report.name, [report.cards[0].card_ref]),
                client.flag_not_mine(report.name, report.cards[0].card_ref),
            )
            for call in calls:
                assert await _refusal(call) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIAL"), pii
        # The session itself was never harmed.
        client.session_token = token
        assert await _refusal(client.list_reports()) == (grpc.StatusCode.OK, "")


async def test_malformed_claims_in_a_signed_token_are_unauthenticated(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        token = client.session_token
        assert token is not None
        for changes in ({"exp": "soon"}, {"exp": 1e400}, {"exp": None}, {"jti": ["x"]}, {"sub": None}):
            client.session_token = _resigned(union, token, **changes)
            code, _ = await _refusal(client.list_reports())
            assert code == grpc.StatusCode.UNAUTHENTICATED, changes
        client.session_token = token
        for page_token in ("v2-00000000.e30.AAAA", "v9-x.e30.AAAA", "v2-.e30.AAAA"):
            code, _ = await _refusal(client.my_audit_events(page_token=page_token))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, page_token
        client.session_token = "v2-00000000.e30.AAAA"  # a key id this union never had
        assert await _refusal(client.list_reports()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_CREDENTIAL",
        )


async def test_rotating_the_key_keeps_older_sessions_until_they_expire(
    make_union: UnionFactory, tmp_path: Path
) -> None:
    first = await make_union()
    old_key = first.keys.current.id
    zhang = await verified_client(first, ZHANG)
    old_token = zhang.session_token
    assert old_token is not None
    assert Keys.token_key_id(old_token) == old_key
    first_page = await zhang.my_audit_events(page_size=1)
    assert Keys.token_key_id(first_page.next_page_token) == old_key
    await zhang.close()
    await first.stop(0)

    result = await asyncio.to_thread(
        CliRunner().invoke, union_app, ["rotate-key", "--data-dir", str(tmp_path / "union")]
    )
    assert result.exit_code == 0, result.output
    union = await make_union()
    new_key = union.keys.current.id
    assert new_key != old_key
    assert f"current key is now {new_key}" in result.output
    assert [key.id for key in union.keys.versions] == [old_key, new_key]

    # The session made before the rotation still works, its sealed identity included.
    async with CardLookupClient(union.address, session_token=old_token) as before:
        # So does a page token signed before it.
        await before.my_audit_events(page_size=1, page_token=first_page.next_page_token)
        _, report = await run_lookup(before)
        assert report.total_card_count > 0
    # A new session is signed and sealed under the new key.
    li = await verified_client(union, LI)
    async with li:
        assert li.session_token is not None
        assert Keys.token_key_id(li.session_token) == new_key
        assert union.keys.verify(Keys.session, li.session_token)["pii"].startswith(f"{new_key}.")
        _, report = await run_lookup(li)
        assert report.total_card_count > 0
    # People keep their pseudonym across the rotation (the person-hash key does not rotate).
    assert union.keys.person_hash(ZHANG.resident_id_number) == first.keys.person_hash(
        ZHANG.resident_id_number
    )


async def test_signing_out_revokes_the_session_everywhere(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        _, report = await run_lookup(client)
        token = client.session_token
        await client.sign_out()
        assert client.session_token is None
        client.session_token = token
        revoked = (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
        assert await _refusal(client.list_reports()) == revoked
        assert await _refusal(client.get_report(report.name)) == revoked
        assert await _refusal(client.create_lookup(consent_terms_version=TERMS_VERSION)) == revoked
        assert await _refusal(client.delete_report(report.name)) == revoked
        assert await _refusal(client.my_audit_events()) == revoked
        assert await _refusal(client.list_closures()) == revoked
        with pytest.raises(CardLookupError) as watched:
            async for _ in client.watch_lookup(report.lookup):
                pass
        assert (watched.value.code, watched.value.reason) == revoked
        # Signing out twice is refused the same way: there is no session left to end.
        assert await _refusal(client.sign_out()) == revoked

    async with CardLookupClient(union.address) as anonymous:
        assert await _refusal(anonymous.sign_out()) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIAL")


async def test_a_new_verification_revokes_the_persons_older_sessions(union: UnionServer) -> None:
    phone = await verified_client(union, ZHANG)
    laptop = await verified_client(union, ZHANG)
    other = await verified_client(union, LI)
    async with phone, laptop, other:
        assert await _refusal(phone.list_reports()) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
        assert await _refusal(laptop.list_reports()) == (grpc.StatusCode.OK, "")
        # Another person's session is theirs alone.
        assert await _refusal(other.list_reports()) == (grpc.StatusCode.OK, "")
        audit = await laptop.my_audit_events()
        assert "session.sign_out" not in {event.action for event in audit.events}


async def test_signing_out_ends_a_watch_already_open(
    union: UnionServer, banks: dict[str, RunningBank]
) -> None:
    """A stream opened before the sign-out gets none of the person's progress after it."""
    for bank in banks.values():
        bank.servicer.faults = FaultSettings(latency_ms=3000)  # no bank answers for a while
    client = await verified_client(union, ZHANG)
    async with client:
        lookup = await client.create_lookup(consent_terms_version=TERMS_VERSION)
        events = client.watch_lookup(lookup.name, stream_timeout=30)
        assert not (await anext(events)).report_ready
        async with CardLookupClient(union.address) as other:
            other.session_token = client.session_token
            await other.sign_out()
        received: list[object] = []

        async def the_rest() -> None:
            async for event in events:
                received.append(event)

        with pytest.raises(CardLookupError) as ended:
            await the_rest()
    assert received == []
    assert (ended.value.code, ended.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")


async def test_sign_out_is_in_the_persons_audit_trail(union: UnionServer) -> None:
    client = await verified_client(union, ZHANG)
    async with client:
        await client.sign_out()
    again = await verified_client(union, ZHANG)
    async with again:
        events = (await again.my_audit_events()).events
        signed_out = [event for event in events if event.action == "session.sign_out"]
        assert [event.outcome for event in signed_out] == ["ok"]


async def test_session_rows_go_when_the_session_would_have_expired(make_union: UnionFactory) -> None:
    clock = FakeClock(datetime(2026, 12, 5, 2, 0, tzinfo=UTC))
    union = await make_union(clock=clock, retention=RetentionPolicy(interval=timedelta(0)))

    def session_rows() -> list[tuple[object, ...]]:
        with union.store.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text("SELECT * FROM sessions"))]

    zhang = await verified_client(union, ZHANG)
    clock.advance(timedelta(minutes=10))
    li = await verified_client(union, LI)
    await zhang.sign_out()  # a signed-out session's row lives as long as the session would have
    async with zhang, li:
        rows = session_rows()
        assert len(rows) == 2
        # Nothing but a keyed hash, a random id and a time: no name, ID or mobile number.
        person_hashes = {union.keys.person_hash(p.resident_id_number) for p in (ZHANG, LI)}
        assert {row[0] for row in rows} == person_hashes
        for value in (v for row in rows for v in row):
            for person in (ZHANG, LI):
                assert person.resident_id_number not in str(value)
                assert person.mobile_number not in str(value)
                assert person.name not in str(value)

        clock.advance(union.config.identity.session_ttl - timedelta(minutes=10) + timedelta(seconds=1))
        await union.orchestrator._maintain(clock.now())  # the retention sweep, as the orchestrator runs it
        assert {row[0] for row in session_rows()} == {union.keys.person_hash(LI.resident_id_number)}
        assert await _refusal(li.list_reports()) == (grpc.StatusCode.OK, "")

        clock.advance(timedelta(minutes=10))
        await union.orchestrator._maintain(clock.now())
        assert session_rows() == []


async def test_sign_out_is_served_with_its_documented_codes(union: UnionServer) -> None:
    """SignOut over a raw stub: OK with a live session, UNAUTHENTICATED with anything else."""
    from cardlookup.v1 import identity_service_pb2_grpc as identity_grpc

    client = await verified_client(union, ZHANG)
    async with client, grpc.aio.insecure_channel(union.address) as channel:
        stub = identity_grpc.IdentityServiceStub(channel)
        metadata = (("authorization", f"Bearer {client.session_token}"),)
        await stub.SignOut(identity_pb.SignOutRequest(), metadata=metadata)
        for bad in (metadata, (("authorization", "Bearer garbage"),), ()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SignOut(identity_pb.SignOutRequest(), metadata=bad)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_notification_that_cannot_be_opened_holds_up_no_other(union: UnionServer) -> None:
    """A report-ready message whose contact was sealed under a key the union no longer holds is
    dropped, and the messages and purges after it still happen."""
    now = union.clock.now()
    with union.store.engine.begin() as connection:
        connection.execute(
            insert(NotificationRow).values(
                lookup_id="l" + "0" * 24,
                report_id="r" + "0" * 24,
                sealed_contact="deadbeef.AAAA",
                create_time=now,
            )
        )
    client = await verified_client(union, ZHANG)
    async with client:
        await run_lookup(client)

    def report_ready_messages() -> list[dict[str, str]]:
        outbox = [json.loads(line) for line in union.config.sms_sink_path.read_text().splitlines()]
        return [m for m in outbox if m["to"] == ZHANG.mobile_number and m["text"] == report_ready_text(7)]

    for _ in range(200):  # bounded by attempts: the outbox is a file, there is nothing to await
        if report_ready_messages():
            break
        await asyncio.sleep(0.05)
    assert len(report_ready_messages()) == 1
    with union.store.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(NotificationRow)) == 0
