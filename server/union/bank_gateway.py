"""The union's gRPC client for bankquery.v1: one channel per bank, proto → domain, failures classified.

This adapter is the only union code that sees the bank contract's wire types.
It rejects an answer without a summary whose count matches (truncation),
records with unknown enum values, and a summary from another bank; the
domain's `check_answer` does the rest.

Card queries go over one long-lived QueryBatchSession stream per bank,
carrying every lookup's query, and every query that is waiting when the
stream is free to write goes in one message: in Python gRPC an RPC costs far
more than a message, and a message far more than the bytes in it, so this is
what lets the union fan out near the transport's limit. A bank that answers
UNIMPLEMENTED is asked over a QuerySession stream (one query per message),
and one that has neither with one QueryCards call per query; each is asked
again for the better way after a while, so the choice is negotiated per bank
and follows the bank's upgrades.

With mutual TLS, the union presents its own certificate and checks that the
bank's certificate names the bank it called (the expected name is the bank
code's DNS-style name, `<code>.bank.cardlookup.test`), so an answer from any
other peer is refused by the handshake itself.

Longer than most modules (~610 lines): the three ways of asking a bank share one channel, one
failure classification and the negotiation between them, which read best side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import grpc
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import SpanKind, TracerProvider

from server.common import tracing
from server.common.grpc_runtime import ClientTls
from server.common.shapes import bank_tls_name
from server.union.domain.banks import BankCallFailed, BankDecision, ReportedCard
from server.union.domain.model import ActionState, Bank, CardStatus, CardType

log = logging.getLogger(__name__)

# Codes after which another attempt may well succeed.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}

_CARD_TYPES = {pb.CARD_TYPE_DEBIT: CardType.DEBIT, pb.CARD_TYPE_CREDIT: CardType.CREDIT}
_CLOSURE_OUTCOMES = {
    pb.CLOSURE_OUTCOME_CLOSED: ActionState.CLOSED,
    pb.CLOSURE_OUTCOME_SCHEDULED: ActionState.SCHEDULED,
    pb.CLOSURE_OUTCOME_BRANCH_VISIT_REQUIRED: ActionState.BRANCH_VISIT_REQUIRED,
    pb.CLOSURE_OUTCOME_REJECTED: ActionState.REJECTED,
}
_CARD_STATUSES = {
    pb.CARD_STATUS_ACTIVE: CardStatus.ACTIVE,
    pb.CARD_STATUS_DORMANT: CardStatus.DORMANT,
    pb.CARD_STATUS_FROZEN: CardStatus.FROZEN,
}


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# How long a bank that answered UNIMPLEMENTED is asked the older way before it is offered the
# newer one again.
SESSION_RETRY_SECONDS = 60.0
# Queries one QueryBatchSession message carries at most (the contract allows 256).
MAX_BATCH = 64
# A session query's deadline is checked this often at most: it may fail up to this late.
DEADLINE_GRANULARITY = 0.05
# How long the union waits for a bank to say whether it has a session RPC (see _refuses).
REFUSAL_CHECK_SECONDS = 5.0


def _failure(error: grpc.aio.AioRpcError) -> BankCallFailed:
    return _code_failure(error.code())


def _code_failure(code: grpc.StatusCode) -> BankCallFailed:
    if code == grpc.StatusCode.NOT_FOUND:
        return BankCallFailed("the bank does not know this card for this person", retryable=False)
    return BankCallFailed(f"bank call failed: {code.name}", retryable=code in RETRYABLE)


class _SessionUnsupported(Exception):
    """The bank answered QuerySession with UNIMPLEMENTED: ask it through QueryCards."""


class _BatchesUnsupported(Exception):
    """The bank answered QueryBatchSession with UNIMPLEMENTED: ask it over a QuerySession."""


_Outbox = asyncio.Queue[pb.QuerySessionRequest | None]


class _QuerySessionLink:
    """One session stream to one bank (QueryBatchSession, or QuerySession where the bank has no
    batches), shared by every query to that bank.

    A query registers a future under its query_id, puts its request on the
    stream and waits for the answer with that id. On a batched stream, the
    requests waiting when the previous message is written go in the next one:
    nothing waits for a batch to fill. `max_outstanding` bounds the unanswered
    queries (and so everything this link holds); a query that finds the link
    full waits, within its own deadline, for a place. When the stream ends,
    every unanswered query fails as retryable and the next query opens a new
    stream.

    Deadlines are one heap and one timer per link rather than a timer per
    query: with long timeouts at a high query rate, the event loop's own timer
    heap would fill with cancelled timers, compared in Python
    (docs/performance.md).
    """

    def __init__(self, channel: grpc.aio.Channel, bank_code: str, max_outstanding: int) -> None:
        self._stub = pb_grpc.BankQueryServiceStub(channel)
        self._bank_code = bank_code
        self._max_outstanding = max_outstanding
        self._in_flight = 0
        self._place_waiters: deque[asyncio.Future[None]] = deque()
        # query_id → (its future, its number): the number tells a query from a later one that
        # reuses the id (a retry) when an old deadline comes up.
        self._pending: dict[str, tuple[asyncio.Future[pb.QuerySessionResponse], int]] = {}
        self._numbered = 0
        self._deadlines: list[tuple[float, int, str]] = []  # a heap of (deadline, number, query_id)
        self._deadline_timer: asyncio.TimerHandle | None = None  # due at _deadline_timer.when()
        self._outbox: _Outbox | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self.unsupported_until = 0.0  # no session of either kind until then
        self.batches_unsupported_until = 0.0  # QuerySession until then

    @property
    def batched(self) -> bool:
        return time.monotonic() >= self.batches_unsupported_until

    @property
    def supported(self) -> bool:
        return time.monotonic() >= self.unsupported_until

    async def query(self, request: pb.QuerySessionRequest, within: float) -> pb.QuerySessionResponse:
        """The bank's answer to one query, or an exception: TimeoutError once `within` seconds
        have passed (waiting for a place included; the link's own deadline heap, not
        asyncio.timeout, for the reason in the class docstring), BankCallFailed, or
        _SessionUnsupported if the bank has no session of either kind."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                return await self._query_once(request, deadline)
            except _BatchesUnsupported:
                continue  # the link now opens a QuerySession: ask there

    async def _query_once(self, request: pb.QuerySessionRequest, deadline: float) -> pb.QuerySessionResponse:
        if self._in_flight >= self._max_outstanding:
            await self._wait_for_place(deadline)
        query_id = request.query_id
        if query_id in self._pending:
            raise BankCallFailed("query id already in flight", retryable=True)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[pb.QuerySessionResponse] = loop.create_future()
        self._numbered += 1
        number = self._numbered
        self._pending[query_id] = (future, number)
        self._in_flight += 1
        heapq.heappush(self._deadlines, (deadline, number, query_id))
        timer = self._deadline_timer
        if timer is None or deadline < timer.when() - DEADLINE_GRANULARITY:
            # Usually armed already, for an earlier deadline; a shorter timeout than those in
            # flight (a lookup near its own deadline) needs it sooner.
            if timer is not None:
                timer.cancel()
            self._deadline_timer = loop.call_at(deadline, self._expire)
        try:
            self.open_detached().put_nowait(request)  # never blocks: the places bound the queue
            return await future
        finally:
            self._in_flight -= 1
            entry = self._pending.get(query_id)
            if entry is not None and entry[1] == number:
                del self._pending[query_id]
            self._hand_on_place()

    def _hand_on_place(self) -> None:
        """A place came free: wake the first query still waiting for one."""
        while self._place_waiters:
            waiter = self._place_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _wait_for_place(self, deadline: float) -> None:
        """The link is full: wait, within the query's own deadline, for a query to finish."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            while self._in_flight >= self._max_outstanding:
                waiter: asyncio.Future[None] = loop.create_future()
                self._place_waiters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    # Woken, but timed out (or cancelled) before taking the place: the next
                    # waiter gets it, or it would wait out its deadline beside a free place.
                    if waiter.done() and not waiter.cancelled():
                        self._hand_on_place()
                    raise

    def _expire(self) -> None:
        """Fail every query whose deadline has passed; come back for the next one, but not sooner
        than DEADLINE_GRANULARITY (a heap entry outlives an answered query until its deadline)."""
        self._deadline_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now + 0.001:
            _, number, query_id = heapq.heappop(deadlines)
            entry = self._pending.get(query_id)
            if entry is not None and entry[1] == number and not entry[0].done():
                entry[0].set_exception(TimeoutError())
        if deadlines:
            self._deadline_timer = loop.call_at(
                max(deadlines[0][0], now + DEADLINE_GRANULARITY), self._expire
            )

    def _open(self) -> _Outbox:
        if self._outbox is None or self._reader is None or self._reader.done():
            outbox: _Outbox = asyncio.Queue()
            batched = self.batched
            call: grpc.aio.StreamStreamCall[Any, Any] = (
                self._stub.QueryBatchSession(self._batches(outbox))
                if batched
                else self._stub.QuerySession(self._requests(outbox))
            )
            self._outbox = outbox
            self._reader = asyncio.create_task(
                self._read(call, outbox, batched), name=f"session-{self._bank_code}"
            )
        return self._outbox

    def open_detached(self) -> _Outbox:
        """`_open`, outside any trace: the stream serves every lookup, not the one asking now."""
        with tracing.Detached():
            return self._open()

    @staticmethod
    async def _requests(outbox: _Outbox) -> AsyncIterator[pb.QuerySessionRequest]:
        while (request := await outbox.get()) is not None:
            yield request

    @staticmethod
    async def _batches(outbox: _Outbox) -> AsyncIterator[pb.QueryBatchSessionRequest]:
        """gRPC asks for the next message once the previous one is written: it carries every
        query that queued up meanwhile (one, at low load)."""
        while (request := await outbox.get()) is not None:
            queries = [request]
            while len(queries) < MAX_BATCH and not outbox.empty():
                more = outbox.get_nowait()
                if more is None:  # closing: what was taken still goes, then the stream ends
                    yield pb.QueryBatchSessionRequest(queries=queries)
                    return
                queries.append(more)
            yield pb.QueryBatchSessionRequest(queries=queries)

    async def _read(self, call: grpc.aio.StreamStreamCall[Any, Any], outbox: _Outbox, batched: bool) -> None:
        # The union never half-closes a stream in use, so a bank that ends one OK has left the
        # queries still on it unanswered: each answer was cut short (a session that is lost, by
        # contrast, ends UNAVAILABLE and its queries are simply asked again).
        failure: Exception = BankCallFailed(
            "bank ended the session without answering (truncated)", retryable=True, truncated=True
        )
        answered = False
        try:
            async for message in call:
                answered = True
                for response in message.answers if batched else (message,):
                    entry = self._pending.get(response.query_id)
                    if entry is not None and not entry[0].done():
                        entry[0].set_result(response)
        except grpc.aio.AioRpcError as error:
            refused = error.code() == grpc.StatusCode.UNIMPLEMENTED or (
                error.code() == grpc.StatusCode.INTERNAL and not answered and await self._refuses(batched)
            )
            if refused and batched:
                self.batches_unsupported_until = time.monotonic() + SESSION_RETRY_SECONDS
                failure = _BatchesUnsupported()
                log.info(
                    "bank has no batched session; asking one query a message", extra={"bank": self._bank_code}
                )
            elif refused:
                self.unsupported_until = time.monotonic() + SESSION_RETRY_SECONDS
                failure = _SessionUnsupported()
                log.info("bank has no query session; asking per call", extra={"bank": self._bank_code})
            else:
                failure = BankCallFailed(f"bank session lost: {error.code().name}", retryable=True)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as error:  # e.g. an answer that does not parse: this stream is done for
            call.cancel()
            log.warning("bank session failed", extra={"bank": self._bank_code, "error": type(error).__name__})
            failure = BankCallFailed("bank session failed", retryable=True)
        finally:
            if self._closing:  # the union is shutting down: nothing was cut short by the bank
                failure = BankCallFailed("bank session closed", retryable=True)
            if self._outbox is outbox:
                self._outbox = None
            # A query registers and sends in one step, so every pending query was sent on this
            # stream: all of them fail with it (retryable), and the next query opens a new one.
            for future, _ in list(self._pending.values()):
                if not future.done():
                    future.set_exception(failure)

    async def _refuses(self, batched: bool) -> bool:
        """Whether the bank answers this kind of session UNIMPLEMENTED, asked on a stream that
        nothing is written to.

        A write that meets a stream the bank has just ended makes grpc.aio report INTERNAL in
        place of the bank's status (grpc/grpc#36066), so a stream that failed INTERNAL before
        any answer may have been refused: a bank without the RPC would be retried as failing,
        never asked the older way. A stream whose side is closed at once races with nothing, and
        its status is the bank's own: UNIMPLEMENTED, or OK from a bank that has the RPC (an empty
        session), which means the INTERNAL was real."""
        method = self._stub.QueryBatchSession if batched else self._stub.QuerySession
        check: grpc.aio.StreamStreamCall[Any, Any] = method(None, timeout=REFUSAL_CHECK_SECONDS)
        # The bank may end the stream first; its status below is what counts.
        with contextlib.suppress(
            grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.RpcError, RuntimeError
        ):
            await check.done_writing()
        return await check.code() == grpc.StatusCode.UNIMPLEMENTED

    async def close(self) -> None:
        self._closing = True
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None


class GrpcBankGateway:
    def __init__(
        self,
        tls: ClientTls | None = None,
        max_records: int = 500,
        max_outstanding_per_bank: int = 512,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._tls = tls
        # A client span per call (trace context in the metadata) and per session query; none when off.
        self._interceptors = tracing.client_interceptors(tracer_provider)
        self._tracer = tracing.tracer(tracer_provider)
        self._max_records = max_records
        self._max_outstanding = max_outstanding_per_bank
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._sessions: dict[tuple[str, str], _QuerySessionLink] = {}

    def _channel(self, bank: Bank) -> grpc.aio.Channel:
        key = (bank.code, bank.address)
        channel = self._channels.get(key)
        if channel is None:
            options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 1024 * 1024)]
            interceptors = self._interceptors or None
            if self._tls is None:
                channel = grpc.aio.insecure_channel(bank.address, options=options, interceptors=interceptors)
            else:
                credentials = grpc.ssl_channel_credentials(
                    self._tls.root_ca, self._tls.private_key, self._tls.cert_chain
                )
                # The configured name, else the catalogue's for a bank that joined with its own, else
                # the default.
                name = self._tls.server_names.get(bank.code) or bank.tls_name or bank_tls_name(bank.code)
                options.append(("grpc.ssl_target_name_override", name))
                channel = grpc.aio.secure_channel(
                    bank.address, credentials, options=options, interceptors=interceptors
                )
            self._channels[key] = channel
        return channel

    async def query_cards(
        self, bank: Bank, query_id: str, resident_id_number: str, name: str, call_timeout: float
    ) -> list[ReportedCard]:
        if not bank.address:
            raise BankCallFailed("bank has no address configured", retryable=True)
        link = self._session(bank)
        if link.supported:
            request = pb.QuerySessionRequest(
                query_id=query_id, resident_id_number=resident_id_number, name=name
            )
            try:
                if self._tracer is None:
                    response = await link.query(request, call_timeout)
                else:
                    response = await self._traced_query(link, bank, request, call_timeout)
            except TimeoutError as error:
                # Worded like the per-call path's deadline, so a report reads the same either way.
                raise _code_failure(grpc.StatusCode.DEADLINE_EXCEEDED) from error
            except _SessionUnsupported:
                pass  # an older bank: ask it the per-call way below
            else:
                return self._session_answer(bank, response)
        return await self._query_per_call(bank, query_id, resident_id_number, name, call_timeout)

    async def _traced_query(
        self, link: _QuerySessionLink, bank: Bank, request: pb.QuerySessionRequest, call_timeout: float
    ) -> pb.QuerySessionResponse:
        """One session query as a client span of the current trace, whose context the query carries."""
        assert self._tracer is not None
        method = "QueryBatchSession" if link.batched else "QuerySession"
        with self._tracer.start_as_current_span(
            f"bankquery.v1.BankQueryService/{method} query",
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.method": method, "cardlookup.bank": bank.code},
        ) as span:
            tracing.inject(request.trace_context)
            response = await link.query(request, call_timeout)
            if response.WhichOneof("result") == "error":
                span.set_attribute("rpc.grpc.status_code", response.error.code)
            return response

    def uses_session(self, bank: Bank) -> bool:
        """Whether queries to `bank` currently go over a session stream (for operators and
        tests: False for a bank that answered UNIMPLEMENTED, until it is offered a session again)."""
        return self._session(bank).supported

    def uses_batches(self, bank: Bank) -> bool:
        """Whether that stream is a QueryBatchSession (False for a bank that answered it
        UNIMPLEMENTED, until it is offered one again)."""
        link = self._session(bank)
        return link.supported and link.batched

    def _session(self, bank: Bank) -> _QuerySessionLink:
        key = (bank.code, bank.address)
        link = self._sessions.get(key)
        if link is None:
            link = _QuerySessionLink(self._channel(bank), bank.code, self._max_outstanding)
            self._sessions[key] = link
        return link

    def _session_answer(self, bank: Bank, response: pb.QuerySessionResponse) -> list[ReportedCard]:
        kind = response.WhichOneof("result")
        if kind == "error":
            code = _STATUS_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
            raise _code_failure(code)
        if kind != "answer":
            raise BankCallFailed("bank sent an empty answer", retryable=False)
        answer = response.answer
        if len(answer.cards) > self._max_records:
            raise BankCallFailed("bank sent too many records", retryable=False)
        if not answer.HasField("summary"):
            raise BankCallFailed("bank answer has no summary (truncated)", retryable=True, truncated=True)
        cards = [self._card(card) for card in answer.cards]
        return self._checked(bank, answer.summary, cards)

    @staticmethod
    def _checked(bank: Bank, summary: pb.QuerySummary, cards: list[ReportedCard]) -> list[ReportedCard]:
        if summary.bank_code != bank.code:
            raise BankCallFailed("summary came from another bank", retryable=False)
        if summary.record_count != len(cards):
            raise BankCallFailed(
                f"summary counts {summary.record_count} records but {len(cards)} arrived (truncated)",
                retryable=True,
                truncated=True,
            )
        return cards

    async def _query_per_call(
        self, bank: Bank, query_id: str, resident_id_number: str, name: str, call_timeout: float
    ) -> list[ReportedCard]:
        stub = pb_grpc.BankQueryServiceStub(self._channel(bank))
        request = pb.QueryCardsRequest(query_id=query_id, resident_id_number=resident_id_number, name=name)
        cards: list[ReportedCard] = []
        summary: pb.QuerySummary | None = None
        call = stub.QueryCards(request, timeout=call_timeout)
        try:
            async for message in call:
                if summary is not None:
                    raise BankCallFailed("bank sent records after its summary", retryable=False)
                kind = message.WhichOneof("result")
                if kind == "summary":
                    summary = message.summary
                elif kind == "card":
                    cards.append(self._card(message.card))
                    if len(cards) > self._max_records:
                        raise BankCallFailed("bank sent too many records", retryable=False)
                else:
                    raise BankCallFailed("bank sent an empty message", retryable=False)
        except grpc.aio.AioRpcError as error:
            if cards and error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                # The bank began its answer and broke off before the summary: a truncated answer
                # (the same break on every attempt is a bank that cannot answer this query).
                raise BankCallFailed(
                    f"bank stream broke after {len(cards)} records, before its summary (truncated)",
                    retryable=True,
                    truncated=True,
                ) from error
            raise _failure(error) from error
        except TimeoutError as error:
            raise BankCallFailed("bank call timed out", retryable=True) from error
        finally:
            call.cancel()
        if summary is None:
            # The stream ended without its summary: a truncated answer, maybe a dying bank.
            raise BankCallFailed(
                "bank stream ended without a summary (truncated)", retryable=True, truncated=True
            )
        return self._checked(bank, summary, cards)

    async def close_card(
        self,
        bank: Bank,
        request_id: str,
        bank_card_ref: str,
        resident_id_number: str,
        name: str,
        call_timeout: float,
    ) -> BankDecision:
        stub = pb_grpc.BankQueryServiceStub(self._channel(bank))
        request = pb.CloseCardRequest(
            request_id=request_id, card_ref=bank_card_ref, resident_id_number=resident_id_number, name=name
        )
        try:
            response = await stub.CloseCard(request, timeout=call_timeout)
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from error
        state = _CLOSURE_OUTCOMES.get(response.outcome)
        if state is None or not response.ticket_id:
            raise BankCallFailed("bank sent an unknown closure outcome or no ticket", retryable=False)
        return BankDecision(state, response.ticket_id[:64], response.reason[:255])

    async def report_not_mine(
        self,
        bank: Bank,
        request_id: str,
        bank_card_ref: str,
        resident_id_number: str,
        name: str,
        call_timeout: float,
    ) -> BankDecision:
        stub = pb_grpc.BankQueryServiceStub(self._channel(bank))
        request = pb.ReportCardNotMineRequest(
            request_id=request_id, card_ref=bank_card_ref, resident_id_number=resident_id_number, name=name
        )
        try:
            response = await stub.ReportCardNotMine(request, timeout=call_timeout)
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from error
        if not response.case_number:
            raise BankCallFailed("bank opened no fraud case", retryable=False)
        return BankDecision(ActionState.FROZEN, response.case_number[:64], "")

    @staticmethod
    def _card(card: pb.CardRecord) -> ReportedCard:
        card_type = _CARD_TYPES.get(card.card_type)
        status = _CARD_STATUSES.get(card.status)
        if card_type is None or status is None:
            raise BankCallFailed("bank sent an unknown card type or status", retryable=False)
        open_time = None
        if card.HasField("open_time"):
            try:
                open_time = card.open_time.ToDatetime(tzinfo=UTC)
            except (ValueError, OverflowError) as error:  # out of the Timestamp range: a lying bank
                raise BankCallFailed("bank sent an impossible open time", retryable=False) from error
        return ReportedCard(
            bank_code=card.bank_code,
            bank_card_ref=card.card_ref,
            card_type=card_type,
            first_four=card.first_four,
            last_four=card.last_four,
            number_length=card.number_length,
            status=status,
            open_time=open_time,
        )

    async def reachable(self, bank: Bank, call_timeout: float) -> bool:
        if not bank.address:
            return False
        try:
            response = await health_pb2_grpc.HealthStub(self._channel(bank)).Check(
                health_pb2.HealthCheckRequest(), timeout=call_timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        links, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(link.close() for link in links))
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(channel.close(None) for channel in channels))
