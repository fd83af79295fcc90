"""A small typed async client for the union's cardlookup.v1 API.

It keeps the session credential, sets deadlines, retries UNAVAILABLE on
idempotent calls, and turns google.rpc rich error details into a readable
`CardLookupError` (field violations, reason, retry-after).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
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
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The version of the union's terms of service this client shows a person (the union's
# CreateLookup refuses a lookup whose consent is not for its current version).
TERMS_VERSION = "2021-12"

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0


@dataclass
class CardLookupError(Exception):
    """A failed call, with the server's explanation."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after: timedelta | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # False when the call never reached the union (nothing listening, DNS, TLS handshake).
    reached_server: bool = True

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        # The server's message for INVALID_ARGUMENT already lists the violations.
        unlisted = [f"{f}: {d}" for f, d in self.field_violations if f"{f}: {d}" not in self.message]
        if unlisted:
            text += " (" + "; ".join(unlisted) + ")"
        if self.retry_after is not None:
            text += f" — retry in {human_duration(self.retry_after)}"
        return text

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError, target: str = "") -> CardLookupError:
        details = error.details() or ""
        result = cls(code=error.code(), message=details)
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        if status is None:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                # The union answers UNAVAILABLE with a google.rpc.Status; without one, the call
                # never got there. gRPC's own text is for gRPC developers, not for people.
                result.message = (
                    f"cannot reach the union at {target or 'its address'}: {_why_unreachable(details)}"
                )
                result.reached_server = False
            return result
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                result.field_violations = [(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                result.reason = info.reason
                result.metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                result.retry_after = retry.retry_delay.ToTimedelta()
        return result


def _why_unreachable(details: str) -> str:
    text = details.lower()
    if "connection refused" in text:
        return "nothing is listening there (is the union running? set --target or CARDLOOKUP_TARGET)"
    if "dns" in text or "resolv" in text or "domain name not found" in text:
        return "the host name does not resolve"
    if "ssl" in text or "handshake" in text or "tls" in text or "certificate" in text:
        return "the TLS handshake failed (check --tls and --ca)"
    if "socket closed" in text or "connection reset" in text:
        return "the connection was closed at once (does the union want --tls and --ca?)"
    if "deadline" in text or "timeout" in text or "timed out" in text:
        return "no answer in time"
    return "no connection"


def human_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds}s"


class CardLookupClient:
    """Async client. Use as `async with CardLookupClient("127.0.0.1:50051") as client: ...`."""

    def __init__(
        self,
        target: str,
        session_token: str | None = None,
        admin_token: str | None = None,
        root_certificates: bytes | None = None,
        tls: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
    ) -> None:
        if tls or root_certificates:
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self.target = target
        self._identity = identity_grpc.IdentityServiceStub(self._channel)
        self._lookups = lookup_grpc.CardLookupServiceStub(self._channel)
        self._admin = admin_grpc.AdminServiceStub(self._channel)
        self._actions = action_grpc.CardActionServiceStub(self._channel)
        self.session_token = session_token
        self.admin_token = admin_token
        self.timeout = timeout
        self.retries = retries

    async def __aenter__(self) -> CardLookupClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    def _metadata(self, admin: bool = False) -> tuple[tuple[str, str], ...]:
        token = self.admin_token if admin else self.session_token
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def _call(self, call: Callable[[], Awaitable[T]], idempotent: bool) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as error:
                attempt += 1
                if idempotent and error.code() == grpc.StatusCode.UNAVAILABLE and attempt <= self.retries:
                    await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
                    continue
                raise CardLookupError.from_rpc_error(error, self.target) from error

    # -- identity -------------------------------------------------------------

    async def start_verification(
        self, name: str, resident_id_number: str, mobile_number: str
    ) -> identity_pb.StartVerificationResponse:
        request = identity_pb.StartVerificationRequest(
            name=name, resident_id_number=resident_id_number, mobile_number=mobile_number
        )
        return await self._call(
            lambda: self._identity.StartVerification(request, timeout=self.timeout), False
        )

    async def complete_verification(
        self, verification_id: str, code: str
    ) -> identity_pb.CompleteVerificationResponse:
        request = identity_pb.CompleteVerificationRequest(verification_id=verification_id, code=code)
        response: identity_pb.CompleteVerificationResponse = await self._call(
            lambda: self._identity.CompleteVerification(request, timeout=self.timeout), False
        )
        self.session_token = response.session_token
        return response

    async def sign_out(self) -> None:
        """Revoke this client's session on the server and forget it."""
        request = identity_pb.SignOutRequest()
        await self._call(
            lambda: self._identity.SignOut(request, metadata=self._metadata(), timeout=self.timeout), True
        )
        self.session_token = None

    # -- lookups and reports ----------------------------------------------------

    async def create_lookup(
        self,
        bank_codes: list[str] | None = None,
        request_id: str | None = None,
        *,
        consent_terms_version: str,
    ) -> lookup_pb.Lookup:
        """Ask the banks (all of them, or `bank_codes`) for the cards in the person's name.

        `consent_terms_version` is the version of the union's terms the person accepted. It has no
        default on purpose: an application shows the terms (`TERMS_VERSION` is the version this
        client knows) and passes what its user agreed to, so a library call never consents for
        anyone. A refusal with reason CONSENT_REQUIRED names the current version."""
        # A fixed request_id makes the create safe to retry (AIP-155).
        request = lookup_pb.CreateLookupRequest(
            request_id=request_id or uuid.uuid4().hex,
            bank_codes=bank_codes or [],
            consent_terms_version=consent_terms_version,
        )
        response: lookup_pb.CreateLookupResponse = await self._call(
            lambda: self._lookups.CreateLookup(request, metadata=self._metadata(), timeout=self.timeout), True
        )
        return response.lookup

    async def get_lookup(self, name: str) -> lookup_pb.Lookup:
        request = lookup_pb.GetLookupRequest(name=name)
        response: lookup_pb.GetLookupResponse = await self._call(
            lambda: self._lookups.GetLookup(request, metadata=self._metadata(), timeout=self.timeout), True
        )
        return response.lookup

    async def watch_lookup(
        self, name: str, stream_timeout: float = 3600.0, group_bank_changes: bool = False
    ) -> AsyncIterator[lookup_pb.WatchLookupResponse]:
        """Progress events until the report is ready; `group_bank_changes` asks for the changes
        seen together in one event (`bank_codes`) instead of one event per bank."""
        call = self._lookups.WatchLookup(
            lookup_pb.WatchLookupRequest(name=name, group_bank_changes=group_bank_changes),
            metadata=self._metadata(),
            timeout=stream_timeout,
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as error:
            raise CardLookupError.from_rpc_error(error, self.target) from error
        finally:
            call.cancel()

    async def get_report(self, name: str) -> lookup_pb.Report:
        request = lookup_pb.GetReportRequest(name=name)
        response: lookup_pb.GetReportResponse = await self._call(
            lambda: self._lookups.GetReport(request, metadata=self._metadata(), timeout=self.timeout), True
        )
        return response.report

    async def list_reports(self, page_size: int = 0, page_token: str = "") -> lookup_pb.ListReportsResponse:
        request = lookup_pb.ListReportsRequest(page_size=page_size, page_token=page_token)
        return await self._call(
            lambda: self._lookups.ListReports(request, metadata=self._metadata(), timeout=self.timeout), True
        )

    async def list_lookups(self, page_size: int = 0, page_token: str = "") -> lookup_pb.ListLookupsResponse:
        request = lookup_pb.ListLookupsRequest(page_size=page_size, page_token=page_token)
        return await self._call(
            lambda: self._lookups.ListLookups(request, metadata=self._metadata(), timeout=self.timeout), True
        )

    async def delete_report(self, name: str) -> None:
        request = lookup_pb.DeleteReportRequest(name=name)
        await self._call(
            lambda: self._lookups.DeleteReport(request, metadata=self._metadata(), timeout=self.timeout),
            False,
        )

    # -- card actions -----------------------------------------------------------

    async def close_cards(
        self, report: str, card_refs: list[str], request_id: str | None = None
    ) -> action_pb.CardClosure:
        request = action_pb.CreateCardClosureRequest(
            request_id=request_id or uuid.uuid4().hex, report=report, card_refs=card_refs
        )
        response: action_pb.CreateCardClosureResponse = await self._call(
            lambda: self._actions.CreateCardClosure(request, metadata=self._metadata(), timeout=self.timeout),
            True,
        )
        return response.closure

    async def get_closure(self, name: str) -> action_pb.CardClosure:
        request = action_pb.GetCardClosureRequest(name=name)
        response: action_pb.GetCardClosureResponse = await self._call(
            lambda: self._actions.GetCardClosure(request, metadata=self._metadata(), timeout=self.timeout),
            True,
        )
        return response.closure

    async def list_closures(
        self, page_size: int = 0, page_token: str = ""
    ) -> action_pb.ListCardClosuresResponse:
        request = action_pb.ListCardClosuresRequest(page_size=page_size, page_token=page_token)
        return await self._call(
            lambda: self._actions.ListCardClosures(request, metadata=self._metadata(), timeout=self.timeout),
            True,
        )

    async def flag_not_mine(
        self, report: str, card_ref: str, request_id: str | None = None
    ) -> action_pb.CardFlag:
        request = action_pb.FlagCardNotMineRequest(
            request_id=request_id or uuid.uuid4().hex, report=report, card_ref=card_ref
        )
        response: action_pb.FlagCardNotMineResponse = await self._call(
            lambda: self._actions.FlagCardNotMine(request, metadata=self._metadata(), timeout=self.timeout),
            True,
        )
        return response.flag

    async def my_audit_events(
        self, page_size: int = 0, page_token: str = ""
    ) -> action_pb.ListMyAuditEventsResponse:
        request = action_pb.ListMyAuditEventsRequest(page_size=page_size, page_token=page_token)
        return await self._call(
            lambda: self._actions.ListMyAuditEvents(request, metadata=self._metadata(), timeout=self.timeout),
            True,
        )

    # -- admin ------------------------------------------------------------------

    async def admin(self, method: str, request: Any) -> Any:
        """Call an AdminService method by name with the admin credential."""
        rpc = getattr(self._admin, method)
        return await self._call(
            lambda: rpc(request, metadata=self._metadata(admin=True), timeout=self.timeout), True
        )

    async def list_banks(self) -> list[admin_pb.Bank]:
        response: admin_pb.ListBanksResponse = await self.admin("ListBanks", admin_pb.ListBanksRequest())
        return list(response.banks)

    async def list_regions(self) -> list[admin_pb.Region]:
        response: admin_pb.ListRegionsResponse = await self.admin(
            "ListRegions", admin_pb.ListRegionsRequest()
        )
        return list(response.regions)

    async def update_bank(
        self, code: str, enabled: bool | None = None, address: str | None = None
    ) -> admin_pb.Bank:
        """Change what is given (not None) of one bank, and nothing else: the update mask names it."""
        request = admin_pb.UpdateBankRequest(code=code, enabled=bool(enabled), address=address or "")
        request.update_mask.paths.extend(
            path for path, value in (("enabled", enabled), ("address", address)) if value is not None
        )
        response: admin_pb.UpdateBankResponse = await self.admin("UpdateBank", request)
        return response.bank

    async def update_region(self, code: str, is_open: bool) -> admin_pb.Region:
        request = admin_pb.UpdateRegionRequest(code=code, open=is_open)
        request.update_mask.paths.append("open")
        response: admin_pb.UpdateRegionResponse = await self.admin("UpdateRegion", request)
        return response.region
