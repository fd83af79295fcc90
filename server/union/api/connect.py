"""The user-facing contract over Connect and gRPC-Web: the same servicers, another transport.

Each Connect method hands its request to the gRPC servicer's own method (api/servicers.py)
with `_CallContext`, which shows the servicer what it reads from a gRPC call — the request
metadata, so `authorization: Bearer …` takes the same path — and turns the servicer's
`abort` into a ConnectError. So authentication, validation and the DomainError → code +
google.rpc details mapping (server.common.grpc_errors) are the gRPC ones, not copies; a
Connect client gets the same code, message and details (JSON with a readable "debug" form).
Admission control counts these calls with the gRPC ones: one capacity for both transports.

`ObservedService` records each call as server.common.rpc_metrics and the gRPC tracing
instrumentation record a gRPC call: the same histogram labels, an access line on the same logger
(with the protocol), a server span of the same name continuing the request's `traceparent`. It
wraps a whole service application, so calls the library refuses before any handler runs
(unparseable or oversized requests, an unknown method) are counted too. The status code is read
from what goes back on the wire, the one place every ending passes through.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any, NoReturn, TypeVar

import grpc
from cardlookup.v1 import card_action_service_connect as action_connect
from cardlookup.v1 import card_action_service_pb2 as action_pb
from cardlookup.v1 import card_lookup_service_connect as lookup_connect
from cardlookup.v1 import card_lookup_service_pb2 as lookup_pb
from cardlookup.v1 import identity_service_connect as identity_connect
from cardlookup.v1 import identity_service_pb2 as identity_pb
from connectrpc import _codec as connect_codecs
from connectrpc import _compression as connect_compressions
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication
from google.protobuf import descriptor_pool, json_format
from google.protobuf.json_format import ParseError
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry import trace
from opentelemetry.trace import Tracer

from server.common import errors, tracing
from server.common.admission import AdmissionControl
from server.common.grpc_errors import to_status
from server.common.rpc_metrics import UNREGISTERED, RpcObserver, peer_of
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


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# What a gRPC client makes of an HTTP error status that carries no status of its own (the
# library's 404 for an unknown method, 415 for a content type it does not speak, ...).
_HTTP_STATUS_CODES = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
_END_OF_STREAM_CONNECT = 0b10
_END_OF_STREAM_GRPC_WEB = 0b10000000
_COMPRESSED = 0b1
# An error answer is a short JSON document; anything longer is not read for its code.
_ERROR_BODY_MAX_BYTES = 64 * 1024


def _grpc_code(connect_code: str) -> grpc.StatusCode:
    """'invalid_argument' (Connect's spelling on the wire) → INVALID_ARGUMENT; 'canceled' → CANCELLED."""
    try:
        return grpc.StatusCode[Code(connect_code).name.replace("CANCELED", "CANCELLED")]
    except ValueError:
        return grpc.StatusCode.UNKNOWN


def _protocol(scope: Scope) -> str:
    content_type = _header(scope, b"content-type") or ""
    if content_type.startswith("application/grpc-web"):
        return "grpc-web"
    if content_type.startswith("application/grpc"):
        return "grpc"
    return "connect"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


class _Answer:
    """What one call sent back, as far as its status code needs: watched on its way out."""

    def __init__(self) -> None:
        self.http_status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()  # an error answer's body
        self.last_chunk = b""  # a stream's last piece: its end-of-stream message
        self.trailers: dict[str, str] = {}
        self._trailers_follow = False  # gRPC proper ends with trailers, not with its body
        self.complete = False
        self.client_left = False

    def watch(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not self.complete:
                self.client_left = True
            return message

        async def watched_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.http_status = int(message["status"])
                self._trailers_follow = bool(message.get("trailers", False))
                self.headers = {
                    bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
                    for k, v in message.get("headers", ())
                }
            elif kind == "http.response.body":
                chunk = bytes(message.get("body", b""))
                if self.http_status != 200 and len(self.body) + len(chunk) <= _ERROR_BODY_MAX_BYTES:
                    self.body += chunk
                if chunk:
                    self.last_chunk = chunk
                self.complete = not message.get("more_body", False) and not self._trailers_follow
            elif kind == "http.response.trailers":
                self.trailers = {
                    bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
                    for k, v in message.get("headers", ())
                }
                self.complete = not message.get("more_trailers", False)
            await send(message)

        return watched_receive, watched_send

    def code(self, error: BaseException | None) -> grpc.StatusCode:
        """The status the caller was told (or, gone mid-answer, CANCELLED)."""
        if self.client_left:
            return grpc.StatusCode.CANCELLED
        if self.http_status is None or not self.complete:
            # The library raised before answering, or stopped mid-answer.
            cancelled = isinstance(error, asyncio.CancelledError)
            return grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
        if self.http_status != 200:
            return self._error_body_code()
        if "grpc-status" in self.trailers:
            return self._grpc_status(self.trailers["grpc-status"])
        content_type = self.headers.get("content-type", "")
        if content_type.startswith("application/grpc-web"):
            return self._grpc_web_end()
        if content_type.startswith("application/connect+"):
            return self._connect_end()
        return grpc.StatusCode.OK  # a Connect unary answer: 200 is success

    def _error_body_code(self) -> grpc.StatusCode:
        assert self.http_status is not None
        try:
            document = json.loads(bytes(self.body))
        except ValueError:
            document = None
        if isinstance(document, dict) and isinstance(document.get("code"), str):
            return _grpc_code(document["code"])
        return _HTTP_STATUS_CODES.get(self.http_status, grpc.StatusCode.UNKNOWN)

    @staticmethod
    def _grpc_status(value: str) -> grpc.StatusCode:
        try:
            return _GRPC_CODES.get(int(value.strip()), grpc.StatusCode.UNKNOWN)
        except ValueError:
            return grpc.StatusCode.UNKNOWN

    def _end_message(self, end_flag: int, encoding_header: str) -> bytes | None:
        """The payload of the stream's last envelope if it is the end-of-stream one."""
        if len(self.last_chunk) < 5:
            return None
        flags, length = struct.unpack(">BI", self.last_chunk[:5])
        if not flags & end_flag:
            return None
        data = self.last_chunk[5 : 5 + length]
        if flags & _COMPRESSED:
            compression = connect_compressions.resolve_compressions(None).get(
                self.headers.get(encoding_header, "identity")
            )
            if compression is None:
                return None
            try:
                data = compression.decompress(data)
            except Exception:  # a frame the library wrote and cannot read back: say UNKNOWN
                return None
        return data

    def _grpc_web_end(self) -> grpc.StatusCode:
        data = self._end_message(_END_OF_STREAM_GRPC_WEB, "grpc-encoding")
        if data is None:
            return grpc.StatusCode.UNKNOWN
        for line in data.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "grpc-status":
                return self._grpc_status(value)
        return grpc.StatusCode.UNKNOWN

    def _connect_end(self) -> grpc.StatusCode:
        data = self._end_message(_END_OF_STREAM_CONNECT, "connect-content-encoding")
        if data is None:
            return grpc.StatusCode.UNKNOWN
        try:
            end = json.loads(data)
        except ValueError:
            return grpc.StatusCode.UNKNOWN
        error = end.get("error") if isinstance(end, dict) else None
        if error is None:
            return grpc.StatusCode.OK
        code = error.get("code") if isinstance(error, dict) else None
        return _grpc_code(code) if isinstance(code, str) else grpc.StatusCode.UNKNOWN


class ObservedService:
    """One service's Connect application, each call on it counted, timed, logged and traced as a
    gRPC call to the same method would be. Reads no request field and no header but
    `content-type` (the protocol) and `traceparent`/`tracestate`."""

    def __init__(
        self, application: ConnectASGIApplication[Any], observer: RpcObserver, tracer: Tracer | None
    ) -> None:
        self.path: str = application.path
        self._application = application
        self._observer = observer
        self._tracer = tracer
        service = descriptor_pool.Default().FindServiceByName(self.path.strip("/"))
        self._methods = frozenset(f"{self.path}/{method.name}" for method in service.methods)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path: str = scope["path"]
        # Anything else is what the caller typed: it is never repeated in a label, line or span.
        method = path if path in self._methods else UNREGISTERED
        client = scope.get("client")
        peer = (str(client[0]), int(client[1])) if client else None
        answer = _Answer()
        receive, send = answer.watch(receive, send)
        span = None
        if self._tracer is not None and method != UNREGISTERED:
            carrier = {
                name: value
                for name in ("traceparent", "tracestate")
                if (value := _header(scope, name.encode())) is not None
            }
            span = tracing.start_server_span(self._tracer, method, carrier, peer)
        error: BaseException | None = None
        try:
            if span is None:
                await self._application(scope, receive, send)
            else:
                with trace.use_span(
                    span, end_on_exit=False, record_exception=False, set_status_on_exception=False
                ):
                    await self._application(scope, receive, send)
        except BaseException as raised:
            error = raised
            raise
        finally:
            code = answer.code(error)
            if span is not None:
                tracing.end_server_span(span, code)
            self._observer.finished(
                method,
                code.name,
                started,
                peer_of(*peer) if peer else "",
                protocol=_protocol(scope),
            )


def applications(
    identity: IdentityServicer,
    lookups: CardLookupServicer,
    actions: CardActionServicer,
    admission: AdmissionControl,
    observer: RpcObserver,
    tracer: Tracer | None = None,
) -> list[ObservedService]:
    """The ASGI applications for cardlookup.v1's user-facing services (AdminService stays gRPC-only),
    observed by `observer` (the gRPC server's) and traced by `tracer` (None: no spans)."""
    services: list[ConnectASGIApplication[Any]] = [
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
    return [ObservedService(service, observer, tracer) for service in services]
