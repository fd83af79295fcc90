"""The user-facing contract over Connect and gRPC-Web: the same servicers, another transport.

Each Connect method hands its request to the gRPC servicer's own method (api/servicers.py)
with `_CallContext`, which shows the servicer what it reads from a gRPC call — the request
metadata, so `authorization: Bearer …` takes the same path — and turns the servicer's
`abort` into a ConnectError. So authentication, validation and the DomainError → code +
google.rpc details mapping (server.common.grpc_errors) are the gRPC ones, not copies; a
Connect client gets the same code, message and details (JSON with a readable "debug" form).
Admission control counts these calls with the gRPC ones: one capacity for both transports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn, TypeVar

import grpc
from cardlookup.v1 import card_action_service_connect as action_connect
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_connect as lookup_connect
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cardlookup.v1 import identity_service_connect as identity_connect
from cardlookup.v1 import identity_service_pb2 as identity_pb
from connectrpc import _codec as connect_codecs
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication
from google.protobuf import json_format
from google.protobuf.json_format import ParseError
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from server.common import errors
from server.common.admission import AdmissionControl
from server.common.grpc_errors import to_status
from server.union.api.servicers import CardActionServicer, CardLookupServicer, IdentityServicer

REQ = TypeVar("REQ")
RES = TypeVar("RES")
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# The largest request the union accepts over HTTP (every cardlookup.v1 request is a few hundred bytes).
READ_MAX_BYTES = 64 * 1024


def connect_error(error: errors.DomainError) -> ConnectError:
    """The ConnectError for a domain error: code, message and details from the one gRPC mapping."""
    status = to_status(error)
    return _from_status(status.code, status.message, status.details)


def _from_status(code: int, message: str, details: Iterable[Any]) -> ConnectError:
    status_code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.INTERNAL)
    return ConnectError(_connect_code(status_code), message, list(details))


def _connect_code(code: grpc.StatusCode) -> Code:
    # gRPC and Connect share the canonical codes and their names, but for one spelling.
    return Code.CANCELED if code is grpc.StatusCode.CANCELLED else Code[code.name]


class _CallContext:
    """The part of grpc.aio.ServicerContext that the servicers use, for one Connect call."""

    def __init__(self, ctx: RequestContext[Any, Any]) -> None:
        self._headers = ctx.request_headers()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._headers.allitems())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Iterable[tuple[str, Any]] = ()
    ) -> NoReturn:
        # grpc_errors.abort packs the google.rpc.Status it built into the trailing metadata (as
        # grpcio-status does); read it back so the details reach the Connect client unchanged.
        for key, value in trailing_metadata:
            if key == STATUS_DETAILS_KEY:
                status = status_pb2.Status.FromString(value)
                raise _from_status(status.code, status.message, status.details)
        raise ConnectError(_connect_code(code), details)


class _Adapter:
    """Runs one servicer method for a Connect call, under the union's admission control."""

    def __init__(self, admission: AdmissionControl) -> None:
        self._admission = admission

    async def unary(
        self, method: Callable[[REQ, Any], Awaitable[RES]], request: REQ, ctx: RequestContext[Any, Any]
    ) -> RES:
        context = _CallContext(ctx)
        async with self._admission.admitted(context, streaming=False):
            return await method(request, context)

    async def stream(
        self, method: Callable[[REQ, Any], AsyncIterator[RES]], request: REQ, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[RES]:
        context = _CallContext(ctx)
        async with self._admission.admitted(context, streaming=True):
            async for message in method(request, context):
                yield message


class IdentityConnect(_Adapter):
    def __init__(self, servicer: IdentityServicer, admission: AdmissionControl) -> None:
        super().__init__(admission)
        self._servicer = servicer

    async def start_verification(
        self, request: identity_pb.StartVerificationRequest, ctx: RequestContext[Any, Any]
    ) -> identity_pb.StartVerificationResponse:
        return await self.unary(self._servicer.StartVerification, request, ctx)

    async def complete_verification(
        self, request: identity_pb.CompleteVerificationRequest, ctx: RequestContext[Any, Any]
    ) -> identity_pb.CompleteVerificationResponse:
        return await self.unary(self._servicer.CompleteVerification, request, ctx)

    async def sign_out(
        self, request: identity_pb.SignOutRequest, ctx: RequestContext[Any, Any]
    ) -> identity_pb.SignOutResponse:
        return await self.unary(self._servicer.SignOut, request, ctx)


class CardLookupConnect(_Adapter):
    def __init__(self, servicer: CardLookupServicer, admission: AdmissionControl) -> None:
        super().__init__(admission)
        self._servicer = servicer

    async def create_lookup(
        self, request: lookup_pb.CreateLookupRequest, ctx: RequestContext[Any, Any]
    ) -> lookup_pb.CreateLookupResponse:
        return await self.unary(self._servicer.CreateLookup, request, ctx)

    async def get_lookup(
        self, request: lookup_pb.GetLookupRequest, ctx: RequestContext[Any, Any]
    ) -> lookup_pb.GetLookupResponse:
        return await self.unary(self._servicer.GetLookup, request, ctx)

    def watch_lookup(
        self, request: lookup_pb.WatchLookupRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[lookup_pb.WatchLookupResponse]:
        return self.stream(self._servicer.WatchLookup, request, ctx)

    async def get_report(
        self, request: lookup_pb.GetReportRequest, ctx: RequestContext[Any, Any]
    ) -> lookup_pb.GetReportResponse:
        return await self.unary(self._servicer.GetReport, request, ctx)

    async def list_reports(
        self, request: lookup_pb.ListReportsRequest, ctx: RequestContext[Any, Any]
    ) -> lookup_pb.ListReportsResponse:
        return await self.unary(self._servicer.ListReports, request, ctx)

    async def delete_report(
        self, request: lookup_pb.DeleteReportRequest, ctx: RequestContext[Any, Any]
    ) -> lookup_pb.DeleteReportResponse:
        return await self.unary(self._servicer.DeleteReport, request, ctx)

    async def list_lookups(
        self, request: lookup_pb.ListLookupsRequest, ctx: RequestContext[Any, Any]
    ) -> lookup_pb.ListLookupsResponse:
        return await self.unary(self._servicer.ListLookups, request, ctx)


class CardActionConnect(_Adapter):
    def __init__(self, servicer: CardActionServicer, admission: AdmissionControl) -> None:
        super().__init__(admission)
        self._servicer = servicer

    async def create_card_closure(
        self, request: action_pb.CreateCardClosureRequest, ctx: RequestContext[Any, Any]
    ) -> action_pb.CreateCardClosureResponse:
        return await self.unary(self._servicer.CreateCardClosure, request, ctx)

    async def get_card_closure(
        self, request: action_pb.GetCardClosureRequest, ctx: RequestContext[Any, Any]
    ) -> action_pb.GetCardClosureResponse:
        return await self.unary(self._servicer.GetCardClosure, request, ctx)

    async def list_card_closures(
        self, request: action_pb.ListCardClosuresRequest, ctx: RequestContext[Any, Any]
    ) -> action_pb.ListCardClosuresResponse:
        return await self.unary(self._servicer.ListCardClosures, request, ctx)

    async def flag_card_not_mine(
        self, request: action_pb.FlagCardNotMineRequest, ctx: RequestContext[Any, Any]
    ) -> action_pb.FlagCardNotMineResponse:
        return await self.unary(self._servicer.FlagCardNotMine, request, ctx)

    async def list_my_audit_events(
        self, request: action_pb.ListMyAuditEventsRequest, ctx: RequestContext[Any, Any]
    ) -> action_pb.ListMyAuditEventsResponse:
        return await self.unary(self._servicer.ListMyAuditEvents, request, ctx)


class _RefusingCodec:
    """A Connect codec whose decode turns unparseable request bytes into INVALID_ARGUMENT.

    The library decodes a request before any handler runs, and a parser exception there
    would become UNKNOWN carrying the parser's text, which can quote what the client sent.
    Like server.common.request_guard for gRPC: a generic reason, never the input.
    JSON answers keep Chinese bank names readable (UTF-8, not \\u escapes) for curl."""

    def __init__(self, inner: Any, kind: str, json: bool) -> None:
        self._inner = inner
        self._kind = kind
        self._json = json

    def name(self) -> str:
        name: str = self._inner.name()
        return name

    def encode(self, message: Any) -> bytes:
        if self._json:
            return json_format.MessageToJson(message, ensure_ascii=False).encode("utf-8")
        encoded: bytes = self._inner.encode(message)
        return encoded

    def decode(self, data: bytes | bytearray, message: Any) -> Any:
        try:
            return self._inner.decode(data, message)
        except (DecodeError, ParseError, UnicodeDecodeError, ValueError, TypeError) as error:
            reason = "invalid UTF-8 in a string field" if "UTF-8" in str(error) else self._kind
            raise connect_error(
                errors.InvalidArgument(
                    [errors.FieldViolation("", f"the request could not be parsed: {reason}")]
                )
            ) from None


def _refuse_unparseable_requests() -> None:
    codecs: dict[str, Any] = connect_codecs._codecs
    for name, codec in list(codecs.items()):
        if not isinstance(codec, _RefusingCodec):
            json = "json" in name
            kind = "not valid protobuf JSON" if json else "not a valid protobuf message"
            codecs[name] = _RefusingCodec(codec, kind, json)


_refuse_unparseable_requests()


def applications(
    identity: IdentityServicer,
    lookups: CardLookupServicer,
    actions: CardActionServicer,
    admission: AdmissionControl,
) -> list[ConnectASGIApplication[Any]]:
    """The ASGI applications for cardlookup.v1's user-facing services (AdminService stays gRPC-only)."""
    return [
        identity_connect.IdentityServiceASGIApplication(
            IdentityConnect(identity, admission), read_max_bytes=READ_MAX_BYTES
        ),
        lookup_connect.CardLookupServiceASGIApplication(
            CardLookupConnect(lookups, admission), read_max_bytes=READ_MAX_BYTES
        ),
        action_connect.CardActionServiceASGIApplication(
            CardActionConnect(actions, admission), read_max_bytes=READ_MAX_BYTES
        ),
    ]
