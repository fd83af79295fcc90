"""Region and bank gating change at run time, without a restart (design invariant 6)."""

from __future__ import annotations

import grpc
import pytest
from cardlookup.v1 import admin_service_pb2 as admin_pb
from google.protobuf import field_mask_pb2

from clients.client import TERMS_VERSION, CardLookupClient, CardLookupError
from server.population.catalogue import PILOT_REGIONS
from server.union.sms import read_last_message
from server.union.union_server import UnionServer
from tests.conftest import WANG, ZHANG, run_lookup, verified_client


async def admin(union: UnionServer) -> CardLookupClient:
    return CardLookupClient(union.address, admin_token="test-admin-token")


async def test_seeded_regions_and_banks(union: UnionServer) -> None:
    async with await admin(union) as client:
        regions = await client.list_regions()
        open_codes = {r.code for r in regions if r.open}
        assert open_codes == {r.code for r in PILOT_REGIONS}
        assert len(open_codes) == 16
        assert {"310000", "530000"} <= open_codes  # pilot batch 1: Shanghai, Yunnan
        banks = await client.list_banks()
        assert [b.code for b in banks][:4] == ["ICBC", "ABC", "BOC", "CCB"]
        assert all(b.enabled for b in banks)
        page = await client.admin("ListRegions", admin_pb.ListRegionsRequest(page_size=10))
        assert len(page.regions) == 10
        assert page.next_page_token


async def test_closed_region_refused_until_opened(union: UnionServer) -> None:
    async with CardLookupClient(union.address) as stranger_to_the_pilot, await admin(union) as operator:
        # Refused before a one-time code is sent: a code for a lookup that cannot run is noise.
        with pytest.raises(CardLookupError) as refused:
            await stranger_to_the_pilot.start_verification(
                WANG.name, WANG.resident_id_number, WANG.mobile_number
            )
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == "REGION_NOT_OPEN"
        assert read_last_message(union.config.sms_sink_path, WANG.mobile_number) is None

        opened = await operator.admin("UpdateRegion", admin_pb.UpdateRegionRequest(code="440000", open=True))
        assert opened.region.open
        assert opened.region.HasField("open_time")
        person = await verified_client(union, WANG)
        async with person:
            events, report = await run_lookup(person, request_id="wang-first")
            first = events[-1].lookup
            assert report.total_card_count == 2

            # A session from while the region was open does not outlive its closing.
            await operator.admin(
                "UpdateRegion",
                admin_pb.UpdateRegionRequest(
                    code="440000", open=False, update_mask=field_mask_pb2.FieldMask(paths=["open"])
                ),
            )
            with pytest.raises(CardLookupError) as closed:
                await person.create_lookup(consent_terms_version=TERMS_VERSION)
            assert closed.value.reason == "REGION_NOT_OPEN"
            # AIP-155: a retry of the request that made a lookup still gets that lookup, region closed
            # or not.
            assert (
                await person.create_lookup(request_id="wang-first", consent_terms_version=TERMS_VERSION)
            ).name == first.name


async def test_disabled_bank_is_not_queried(union: UnionServer) -> None:
    person = await verified_client(union, ZHANG)
    async with person, await admin(union) as operator:
        await operator.admin(
            "UpdateBank",
            admin_pb.UpdateBankRequest(
                code="CMB", enabled=False, update_mask=field_mask_pb2.FieldMask(paths=["enabled"])
            ),
        )
        _, report = await run_lookup(person)
        assert "CMB" not in {s.bank_code for s in report.bank_summaries}
        assert len(report.bank_summaries) == 15
        stats = await operator.admin("GetServiceStats", admin_pb.GetServiceStatsRequest())
        assert stats.people_verified == 1
        assert stats.lookups_created == 1
        assert stats.reports_generated == 1
        assert {b.bank_code for b in stats.bank_stats} == {s.bank_code for s in report.bank_summaries}
        assert all(b.answered_count == 1 for b in stats.bank_stats)

        with pytest.raises(CardLookupError) as unknown:
            await operator.admin("UpdateBank", admin_pb.UpdateBankRequest(code="NOBANK", enabled=True))
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(CardLookupError) as bad:
            await operator.admin("UpdateRegion", admin_pb.UpdateRegionRequest(code="44", open=True))
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
