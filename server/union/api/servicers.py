"""gRPC servicers of the union: thin adapters, proto → domain call → proto.

Errors are raised by the domain as DomainError and turned into statuses by
`@grpc_method` (server.common.grpc_errors); nothing here decides a status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from cardlookup.v1 import admin_service_pb2 as admin_pb
from cardlookup.v1 import admin_service_pb2_grpc as admin_grpc
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_action_service_pb2_grpc as action_grpc
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cardlookup.v1 import card_lookup_service_pb2_grpc as lookup_grpc
from cardlookup.v1 import identity_service_pb2 as identity_pb
from cardlookup.v1 import identity_service_pb2_grpc as identity_grpc

from server.common import errors
from server.common.grpc_errors import grpc_method
from server.union.api import convert
from server.union.domain import model
from server.union.domain.admin import AUDIT_ACTOR, AdminService
from server.union.domain.audit import AuditTrail
from server.union.domain.card_actions import CardActionService
from server.union.domain.identity import Caller, IdentityService
from server.union.domain.lookups import LookupService
from server.union.domain.ports import AdminCredential

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


def _authorization(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _page(items: list[T], page_size: int, page_token: str, default_all: bool = True) -> tuple[list[T], str]:
    """Offset pagination for the small admin lists (banks, regions): tokens are plain offsets."""
    if page_size < 0:
        raise errors.InvalidArgument([errors.FieldViolation("page_size", "must not be negative")])
    try:
        start = int(page_token) if page_token else 0
    except ValueError:
        start = -1
    if start < 0 or start > len(items):
        raise errors.InvalidArgument(
            [errors.FieldViolation("page_token", "not a page token from this server")]
        )
    size = min(page_size, 100) if page_size else (100 if default_all else 10)
    end = start + size
    return items[start:end], (str(end) if end < len(items) else "")


class IdentityServicer(identity_grpc.IdentityServiceServicer):
    def __init__(self, identity: IdentityService) -> None:
        self._identity = identity

    @grpc_method
    async def StartVerification(
        self, request: identity_pb.StartVerificationRequest, context: Context
    ) -> identity_pb.StartVerificationResponse:
        started = await self._identity.start_verification(
            request.name, request.resident_id_number, request.mobile_number
        )
        return identity_pb.StartVerificationResponse(
            verification_id=started.verification_id,
            masked_mobile_number=started.masked_mobile_number,
            code_expire_time=convert.timestamp(started.code_expire_time),
        )

    @grpc_method
    async def CompleteVerification(
        self, request: identity_pb.CompleteVerificationRequest, context: Context
    ) -> identity_pb.CompleteVerificationResponse:
        session = await self._identity.complete_verification(request.verification_id, request.code)
        return identity_pb.CompleteVerificationResponse(
            session_token=session.token,
            expire_time=convert.timestamp(session.expire_time),
            region_code=session.region_code,
        )

    @grpc_method
    async def SignOut(
        self, request: identity_pb.SignOutRequest, context: Context
    ) -> identity_pb.SignOutResponse:
        await self._identity.sign_out(_authorization(context))
        return identity_pb.SignOutResponse()


class CardLookupServicer(lookup_grpc.CardLookupServiceServicer):
    def __init__(self, identity: IdentityService, lookups: LookupService) -> None:
        self._identity = identity
        self._lookups = lookups

    async def _caller(self, context: Context) -> Caller:
        return await self._identity.authenticate(_authorization(context))

    @grpc_method
    async def CreateLookup(
        self, request: lookup_pb.CreateLookupRequest, context: Context
    ) -> lookup_pb.CreateLookupResponse:
        lookup = await self._lookups.create_lookup(
            await self._caller(context), request.request_id, request.bank_codes, request.consent_terms_version
        )
        return lookup_pb.CreateLookupResponse(lookup=convert.lookup(lookup))

    @grpc_method
    async def GetLookup(
        self, request: lookup_pb.GetLookupRequest, context: Context
    ) -> lookup_pb.GetLookupResponse:
        lookup = await self._lookups.get_lookup(await self._caller(context), request.name)
        return lookup_pb.GetLookupResponse(lookup=convert.lookup(lookup))

    @grpc_method
    async def WatchLookup(
        self, request: lookup_pb.WatchLookupRequest, context: Context
    ) -> AsyncIterator[lookup_pb.WatchLookupResponse]:
        converted: tuple[object, lookup_pb.Lookup] | None = None
        async for event in self._lookups.watch_lookup(
            await self._caller(context), request.name, request.group_bank_changes
        ):
            # The events of one re-read share their lookup (16 banks answering together are 16
            # events): convert it once, not once per event.
            if converted is None or converted[0] is not event.lookup:
                if converted is not None:
                    # A session signed out, replaced or expired while the stream is open ends it:
                    # no re-read reaches a credential that no longer holds.
                    await self._caller(context)
                converted = (event.lookup, convert.lookup(event.lookup))
            yield lookup_pb.WatchLookupResponse(
                lookup=converted[1],
                bank_code=event.bank_codes[0] if event.bank_codes else "",
                bank_codes=event.bank_codes,
                report_ready=event.report_ready,
            )

    @grpc_method
    async def GetReport(
        self, request: lookup_pb.GetReportRequest, context: Context
    ) -> lookup_pb.GetReportResponse:
        report = await self._lookups.get_report(await self._caller(context), request.name)
        return lookup_pb.GetReportResponse(report=convert.report(report))

    @grpc_method
    async def ListReports(
        self, request: lookup_pb.ListReportsRequest, context: Context
    ) -> lookup_pb.ListReportsResponse:
        reports, token = await self._lookups.list_reports(
            await self._caller(context), request.page_size, request.page_token
        )
        return lookup_pb.ListReportsResponse(
            reports=[convert.report(r) for r in reports], next_page_token=token
        )

    @grpc_method
    async def DeleteReport(
        self, request: lookup_pb.DeleteReportRequest, context: Context
    ) -> lookup_pb.DeleteReportResponse:
        await self._lookups.delete_report(await self._caller(context), request.name)
        return lookup_pb.DeleteReportResponse()

    @grpc_method
    async def ListLookups(
        self, request: lookup_pb.ListLookupsRequest, context: Context
    ) -> lookup_pb.ListLookupsResponse:
        lookups, token = await self._lookups.list_lookups(
            await self._caller(context), request.page_size, request.page_token
        )
        return lookup_pb.ListLookupsResponse(
            lookups=[convert.lookup(lookup) for lookup in lookups], next_page_token=token
        )


class CardActionServicer(action_grpc.CardActionServiceServicer):
    def __init__(self, identity: IdentityService, actions: CardActionService) -> None:
        self._identity = identity
        self._actions = actions

    async def _caller(self, context: Context) -> Caller:
        return await self._identity.authenticate(_authorization(context))

    @grpc_method
    async def CreateCardClosure(
        self, request: action_pb.CreateCardClosureRequest, context: Context
    ) -> action_pb.CreateCardClosureResponse:
        closure = await self._actions.create_closure(
            await self._caller(context), request.request_id, request.report, list(request.card_refs)
        )
        return action_pb.CreateCardClosureResponse(closure=convert.closure(closure))

    @grpc_method
    async def GetCardClosure(
        self, request: action_pb.GetCardClosureRequest, context: Context
    ) -> action_pb.GetCardClosureResponse:
        closure = await self._actions.get_closure(await self._caller(context), request.name)
        return action_pb.GetCardClosureResponse(closure=convert.closure(closure))

    @grpc_method
    async def ListCardClosures(
        self, request: action_pb.ListCardClosuresRequest, context: Context
    ) -> action_pb.ListCardClosuresResponse:
        closures, token = await self._actions.list_closures(
            await self._caller(context), request.page_size, request.page_token
        )
        return action_pb.ListCardClosuresResponse(
            closures=[convert.closure(c) for c in closures], next_page_token=token
        )

    @grpc_method
    async def FlagCardNotMine(
        self, request: action_pb.FlagCardNotMineRequest, context: Context
    ) -> action_pb.FlagCardNotMineResponse:
        flag = await self._actions.flag_not_mine(
            await self._caller(context), request.request_id, request.report, request.card_ref
        )
        return action_pb.FlagCardNotMineResponse(flag=convert.flag(flag))

    @grpc_method
    async def ListMyAuditEvents(
        self, request: action_pb.ListMyAuditEventsRequest, context: Context
    ) -> action_pb.ListMyAuditEventsResponse:
        events, token = await self._actions.list_my_audit_events(
            await self._caller(context), request.page_size, request.page_token
        )
        return action_pb.ListMyAuditEventsResponse(
            events=[convert.audit_event(e) for e in events], next_page_token=token
        )


class AdminServicer(admin_grpc.AdminServiceServicer):
    def __init__(self, admin: AdminService, audit: AuditTrail) -> None:
        self._admin = admin
        self._audit = audit

    async def _credential(self, context: Context) -> AdminCredential:
        return await self._admin.authorize(_authorization(context))

    @grpc_method
    async def ListBanks(
        self, request: admin_pb.ListBanksRequest, context: Context
    ) -> admin_pb.ListBanksResponse:
        await self._credential(context)
        banks, token = _page(await self._admin.list_banks(), request.page_size, request.page_token)
        return admin_pb.ListBanksResponse(banks=[convert.bank(b) for b in banks], next_page_token=token)

    @grpc_method
    async def CreateBank(
        self, request: admin_pb.CreateBankRequest, context: Context
    ) -> admin_pb.CreateBankResponse:
        credential = await self._credential(context)
        given = request.bank
        bank = await self._admin.create_bank(
            credential,
            model.NewBank(
                code=given.code,
                name=given.name,
                english_name=given.english_name,
                interbank_code=given.interbank_code,
                address=given.address,
                tls_name=given.tls_name,
            ),
        )
        return admin_pb.CreateBankResponse(bank=convert.bank(bank))

    @grpc_method
    async def UpdateBank(
        self, request: admin_pb.UpdateBankRequest, context: Context
    ) -> admin_pb.UpdateBankResponse:
        bank = await self._admin.update_bank(
            await self._credential(context),
            request.code,
            request.enabled,
            request.address,
            list(request.update_mask.paths),
        )
        return admin_pb.UpdateBankResponse(bank=convert.bank(bank))

    @grpc_method
    async def ListRegions(
        self, request: admin_pb.ListRegionsRequest, context: Context
    ) -> admin_pb.ListRegionsResponse:
        await self._credential(context)
        regions, token = _page(await self._admin.list_regions(), request.page_size, request.page_token)
        return admin_pb.ListRegionsResponse(
            regions=[convert.region(r) for r in regions], next_page_token=token
        )

    @grpc_method
    async def UpdateRegion(
        self, request: admin_pb.UpdateRegionRequest, context: Context
    ) -> admin_pb.UpdateRegionResponse:
        region = await self._admin.update_region(
            await self._credential(context), request.code, request.open, list(request.update_mask.paths)
        )
        return admin_pb.UpdateRegionResponse(region=convert.region(region))

    @grpc_method
    async def GetServiceStats(
        self, request: admin_pb.GetServiceStatsRequest, context: Context
    ) -> admin_pb.GetServiceStatsResponse:
        await self._credential(context)
        stats = await self._admin.stats()
        return admin_pb.GetServiceStatsResponse(
            people_verified=stats.people_verified,
            lookups_created=stats.lookups_created,
            reports_generated=stats.reports_generated,
            bank_stats=[
                admin_pb.BankStats(
                    bank_code=b.bank_code,
                    answered_count=b.answered,
                    failed_count=b.failed,
                    mean_latency_ms=b.mean_latency_ms,
                )
                for b in stats.banks
            ],
        )

    @grpc_method
    async def ListAuditEvents(
        self, request: admin_pb.ListAuditEventsRequest, context: Context
    ) -> admin_pb.ListAuditEventsResponse:
        credential = await self._credential(context)
        if request.actor and not AUDIT_ACTOR.fullmatch(request.actor):
            raise errors.InvalidArgument(
                [
                    errors.FieldViolation(
                        "actor",
                        "must be a person's actor hash, admin:<credential id>, admin:console or admin",
                    )
                ]
            )
        events, token = await self._audit.read(
            credential.actor,
            request.actor or None,
            convert.optional_datetime(request, "start_time"),
            convert.optional_datetime(request, "end_time"),
            request.page_size,
            request.page_token,
            operator=True,
        )
        return admin_pb.ListAuditEventsResponse(
            events=[convert.audit_event(e) for e in events], next_page_token=token
        )
