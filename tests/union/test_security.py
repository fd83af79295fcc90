"""Ownership, credentials and verification limits (design invariant 2 and the Security section)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb

from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError
from server.union.clock import FakeClock
from server.union.sms import read_one_time_code
from server.union.union_server import UnionServer
from tests.conftest import LI, ZHANG, UnionFactory, run_lookup, verified_client


async def _code(client_call: object) -> grpc.StatusCode:
    try:
        await client_call  # type: ignore[misc]
    except CardLookupError as error:
        return error.code
    return grpc.StatusCode.OK


async def test_nobody_sees_another_persons_lookup_or_report(union: UnionServer) -> None:
    zhang = await verified_client(union, ZHANG)
    li = await verified_client(union, LI)
    async with zhang, li:
        events, report = await run_lookup(zhang)
        lookup_name = events[-1].lookup.name
        assert await _code(li.get_lookup(lookup_name)) == grpc.StatusCode.NOT_FOUND
        assert await _code(li.get_report(report.name)) == grpc.StatusCode.NOT_FOUND
        assert await _code(li.delete_report(report.name)) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(CardLookupError) as watched:
            async for _ in li.watch_lookup(lookup_name):
                pass
        assert watched.value.code == grpc.StatusCode.NOT_FOUND
        assert (await li.list_reports()).reports == []
        # A name that does not exist at all answers exactly the same.
        assert await _code(li.get_report("reports/rdoesnotexist")) == grpc.StatusCode.NOT_FOUND
        # And the owner still has it.
        assert (await zhang.get_report(report.name)).name == report.name


async def test_credentials_are_required_and_checked(union: UnionServer) -> None:
    async with CardLookupClient(union.address) as anonymous:
        assert (
            await _code(anonymous.create_lookup(consent_terms_version=TERMS_VERSION))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        anonymous.session_token = "v1.e30.AAAA"
        assert await _code(anonymous.list_reports()) == grpc.StatusCode.UNAUTHENTICATED
        anonymous.session_token = "garbage"
        assert await _code(anonymous.list_reports()) == grpc.StatusCode.UNAUTHENTICATED

    client = await verified_client(union, ZHANG)
    async with client:
        token = client.session_token
        assert token is not None
        version, body, signature = token.split(".")
        # Tampered claims (another person's hash would go here) break the signature.
        client.session_token = f"{version}.{body[:-3]}AAA.{signature}"
        assert await _code(client.list_reports()) == grpc.StatusCode.UNAUTHENTICATED
        client.session_token = token
        assert await _code(client.list_reports()) == grpc.StatusCode.OK
        # A session credential is not an admin credential.
        client.admin_token = token
        assert await _code(client.list_banks()) == grpc.StatusCode.UNAUTHENTICATED


async def test_session_expires(make_union: UnionFactory) -> None:
    clock = FakeClock(datetime(2026, 11, 27, 2, 0, tzinfo=UTC))
    union = await make_union(clock=clock)
    client = await verified_client(union, ZHANG)
    async with client:
        assert await _code(client.list_reports()) == grpc.StatusCode.OK
        clock.advance(union.config.identity.session_ttl + timedelta(seconds=1))
        with pytest.raises(CardLookupError) as expired:
            await client.list_reports()
        assert expired.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert expired.value.reason == "EXPIRED_CREDENTIAL"


async def test_verification_input_and_limits(union: UnionServer) -> None:
    async with CardLookupClient(union.address) as client:
        bad_check_digit = ZHANG.resident_id_number[:17] + (
            "0" if ZHANG.resident_id_number[17] != "0" else "1"
        )
        with pytest.raises(CardLookupError) as invalid:
            await client.start_verification(ZHANG.name, bad_check_digit, "1391")
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {f for f, _ in invalid.value.field_violations} == {"resident_id_number", "mobile_number"}

        with pytest.raises(CardLookupError) as mismatch:
            await client.start_verification("李四", ZHANG.resident_id_number, ZHANG.mobile_number)
        assert mismatch.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert mismatch.value.reason == "IDENTITY_MISMATCH"

        started = await client.start_verification(LI.name, LI.resident_id_number, LI.mobile_number)
        right = read_one_time_code(union.config.sms_sink_path, LI.mobile_number)
        assert right is not None
        wrong = f"{(int(right) + 1) % 1_000_000:06d}"
        codes = []
        for _ in range(union.config.identity.max_code_attempts):
            codes.append(await _code(client.complete_verification(started.verification_id, wrong)))
        assert codes[:-1] == [grpc.StatusCode.UNAUTHENTICATED] * (len(codes) - 1)
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Locked: even the right code no longer works for this verification.
        with pytest.raises(CardLookupError) as locked:
            await client.complete_verification(started.verification_id, right)
        assert locked.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert locked.value.reason == "VERIFICATION_LOCKED"
        # Locked for good: no RetryInfo (retrying this call cannot succeed); a new one starts at once.
        assert locked.value.retry_after is None
        await client.start_verification(LI.name, LI.resident_id_number, LI.mobile_number)

        # A used verification cannot be completed twice.
        again = await client.start_verification(ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number)
        code = read_one_time_code(union.config.sms_sink_path, ZHANG.mobile_number)
        assert code is not None
        await client.complete_verification(again.verification_id, code)
        assert (
            await _code(client.complete_verification(again.verification_id, code))
            == grpc.StatusCode.NOT_FOUND
        )


async def test_too_many_verifications_are_refused(union: UnionServer) -> None:
    async with CardLookupClient(union.address) as client:
        for _ in range(union.config.identity.max_starts_per_window):
            await client.start_verification(ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number)
        with pytest.raises(CardLookupError) as limited:
            await client.start_verification(ZHANG.name, ZHANG.resident_id_number, ZHANG.mobile_number)
        assert limited.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert limited.value.retry_after is not None


async def test_admin_needs_the_admin_credential(union: UnionServer) -> None:
    async with CardLookupClient(union.address) as client:
        assert await _code(client.list_banks()) == grpc.StatusCode.UNAUTHENTICATED
        client.admin_token = "wrong"
        assert await _code(client.admin("GetServiceStats", admin_pb.GetServiceStatsRequest())) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        client.admin_token = "test-admin-token"
        assert len(await client.list_banks()) == 16
