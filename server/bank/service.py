"""bankquery.v1.BankQueryService for one simulated bank.

QueryCards validates the union's request, reads the bank's own store off the
event loop, masks every card at the source and streams the records followed by
a summary. Fault settings (server.bank.faults) bend that behaviour on purpose.

QuerySession answers many queries on one long-lived stream with the same
meaning, each in one message; QueryBatchSession is the same stream with
several queries (and answers) to a message. Both are built for throughput,
since per-RPC and per-message costs are what limit a Python gRPC bank: a
reader task takes queries off the stream (and stops while
MAX_OUTSTANDING_QUERIES are unanswered: the contract's backpressure),
queries that arrive while a read is in progress are looked up together in one
SQL statement (on the event loop when the batch is small and
the store a local SQLite file, in a worker thread otherwise), injected delays
are timers rather than tasks, and the handler itself is the stream's only
writer (on a batched stream it sends every answer that is ready in one
message). Faults apply per query (one snapshot each); a failed query is answered
with a QueryError and the stream goes on, except the die knobs, which end the
stream.

CloseCard and ReportCardNotMine (unary) go through the same fault gate as
QueryCards (outage, latency, injected errors; the stream-only knobs do not
apply), then let server.bank.actions decide. Both are idempotent on request_id.

Longer than most modules (~640 lines): the three query RPCs share their
validation, fault gate and batching, which read best beside each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from bankquery.v1 import bank_query_service_pb2 as pb
from bankquery.v1 import bank_query_service_pb2_grpc as pb_grpc
from google.protobuf.message import DecodeError
from opentelemetry.trace import Span, SpanKind, Tracer

from server.bank import actions
from server.bank.faults import FaultSettings, lie_about, other_bank_code
from server.bank.masking import to_card_record
from server.bank.store import ActionAnswer, ActionKind, BankStore, CardNotFound, RequestConflict, StoredCard
from server.common import errors, tracing
from server.common.checks import is_valid_resident_id
from server.common.grpc_errors import grpc_method

log = logging.getLogger(__name__)

SERVICE_NAME = "bankquery.v1.BankQueryService"
_QUERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_NAME_LENGTH = 64
_MAX_CARD_REF_LENGTH = 128

# Unanswered queries one QuerySession stream may have before the bank stops reading it.
MAX_OUTSTANDING_QUERIES = 512
# A batch of at most this many people is read from a local SQLite store on the event loop: such a
# read costs less than the hop to a worker thread and back, and 16 banks' threads contending for
# the GIL made one bank process spend most of its time waiting for it (docs/performance.md). (A WAL
# reader is never blocked by the bank's writers.) Larger batches still go to a thread.
INLINE_READ_LIMIT = 16
# Queries (and answers) one QueryBatchSession message may carry, as the contract says.
MAX_BATCH = 256

CardActionRequest = pb.CloseCardRequest | pb.ReportCardNotMineRequest
CardQuery = pb.QueryCardsRequest | pb.QuerySessionRequest

_CLOSURE_OUTCOMES: dict[str, pb.ClosureOutcome.ValueType] = {
    actions.ClosureOutcome.CLOSED: pb.CLOSURE_OUTCOME_CLOSED,
    actions.ClosureOutcome.SCHEDULED: pb.CLOSURE_OUTCOME_SCHEDULED,
    actions.ClosureOutcome.BRANCH_VISIT_REQUIRED: pb.CLOSURE_OUTCOME_BRANCH_VISIT_REQUIRED,
    actions.ClosureOutcome.REJECTED: pb.CLOSURE_OUTCOME_REJECTED,
}


def _person_violations(resident_id_number: str, name: str) -> list[errors.FieldViolation]:
    violations: list[errors.FieldViolation] = []
    if not is_valid_resident_id(resident_id_number):
        violations.append(
            errors.FieldViolation(
                "resident_id_number", "must be an 18-character GB 11643 number with a valid check character"
            )
        )
    if not name.strip() or len(name) > _MAX_NAME_LENGTH or not name.isprintable():
        violations.append(errors.FieldViolation("name", "must be 1-64 printable characters, not blank"))
    return violations


def _query_violations(request: CardQuery) -> list[errors.FieldViolation]:
    violations: list[errors.FieldViolation] = []
    if not _QUERY_ID.fullmatch(request.query_id):
        violations.append(errors.FieldViolation("query_id", "must be 1-64 characters of [A-Za-z0-9_-]"))
    return violations + _person_violations(request.resident_id_number, request.name)


def validate_request(request: CardQuery) -> None:
    """Raise InvalidArgument naming every bad field (never echoing the values: they are PII)."""
    violations = _query_violations(request)
    if violations:
        raise errors.InvalidArgument(violations)


def validate_action_request(request: CardActionRequest) -> None:
    """CloseCard / ReportCardNotMine: the same person checks as QueryCards, plus request_id and card_ref."""
    violations: list[errors.FieldViolation] = []
    if not _QUERY_ID.fullmatch(request.request_id):
        violations.append(errors.FieldViolation("request_id", "must be 1-64 characters of [A-Za-z0-9_-]"))
    card_ref = request.card_ref
    if not card_ref or len(card_ref) > _MAX_CARD_REF_LENGTH or not card_ref.isprintable():
        violations.append(errors.FieldViolation("card_ref", "must be 1-128 printable characters"))
    violations += _person_violations(request.resident_id_number, request.name)
    if violations:
        raise errors.InvalidArgument(violations)


def _dies_now(faults: FaultSettings, sent: int) -> bool:
    """The stream breaks once `die_after_records` messages are out, before the next one (or the summary)."""
    return faults.die_after_records is not None and sent >= faults.die_after_records


def _error(query_id: str, code: grpc.StatusCode, message: str) -> pb.QuerySessionResponse:
    number: int = code.value[0]
    return pb.QuerySessionResponse(query_id=query_id, error=pb.QueryError(code=number, message=message))


@dataclass(slots=True)
class _Query:
    """One query of a QuerySession stream, with the fault snapshot it was read under."""

    query_id: str
    resident_id_number: str
    name: str
    faults: FaultSettings


@dataclass(frozen=True, slots=True)
class _StreamEnd:
    """Queued behind the answers already due: the writer sends those, then ends the stream here."""

    abort: bool  # UNAVAILABLE; otherwise a clean OK end with queries left unanswered
    reason: str


class _ReadDone:
    """Queued when the union half-closes: end OK once every query read is answered."""


_READ_DONE = _ReadDone()

_Outgoing = pb.QuerySessionResponse | _StreamEnd | _ReadDone | Exception
SessionRequest = pb.QuerySessionRequest | pb.QueryBatchSessionRequest


class _QuerySession:
    """The state of one QuerySession or QueryBatchSession stream (see the module docstring).

    Everything runs on the event loop except the store reads; callbacks only append to
    `outgoing`, which the servicer's handler drains as the stream's single writer.
    """

    def __init__(
        self,
        servicer: BankQueryServicer,
        requests: AsyncIterator[SessionRequest],
        max_outstanding: int,
        batched: bool,
    ) -> None:
        self._servicer = servicer
        self._bank = servicer.bank_code
        self._requests = requests
        self._rng = servicer._rng
        self._loop = asyncio.get_running_loop()
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.batched = batched
        # Bounded by max_outstanding (plus one batch: see _read).
        self.outgoing: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._max_outstanding = max_outstanding
        self._room = asyncio.Event()
        self._pending: list[_Query] = []  # waiting for the next store read
        self._lookup_wanted = asyncio.Event()
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._ending = False
        # With tracing on: a span per query, child of the union's span that the query names
        # (its trace_context), not of the stream, which carries many lookups' queries.
        self._tracer = servicer.tracer
        self._span_name = f"{SERVICE_NAME}/{'QueryBatchSession' if batched else 'QuerySession'} query"
        self._spans: dict[str, Span] = {}
        self.started = time.monotonic()
        self.received = 0  # queries
        self.messages = 0  # request messages (fewer than queries on a batched stream)
        self.answered = 0
        self.failed = 0
        self.outstanding = 0  # read and not yet written
        self.reading_done = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read(), name=f"query-session-read-{self._bank}"),
            asyncio.create_task(self._look_up(), name=f"query-session-lookup-{self._bank}"),
        ]

    def written(self, answers: int = 1) -> None:
        """Answers are on the wire: their queries no longer count against the limit."""
        self.outstanding -= answers
        if self.outstanding < self._max_outstanding:
            self._room.set()

    async def close(self) -> None:
        """Stop reading, looking up and waiting; nothing of this stream outlives the call."""
        self._ending = True
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for span in self._spans.values():
            tracing.end_failed(span, "the stream ended before the answer")
        self._spans.clear()

    # --- reading ---------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            requests = aiter(self._requests)
            while not self._ending:
                # Room before every read: at the limit the bank stops reading (backpressure). A
                # batch may take it past the limit, by at most that batch.
                while self.outstanding >= self._max_outstanding:
                    self._room.clear()
                    await self._room.wait()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    self.outgoing.put_nowait(_READ_DONE)
                    return
                self.messages += 1
                if isinstance(request, pb.QueryBatchSessionRequest):
                    if not 1 <= len(request.queries) <= MAX_BATCH:
                        self.outgoing.put_nowait(
                            errors.InvalidArgument(
                                [errors.FieldViolation("queries", f"must hold 1 to {MAX_BATCH} queries")]
                            )
                        )
                        return
                    for query in request.queries:
                        if not self._ending:
                            self._receive(query)
                else:
                    self._receive(request)
        except (DecodeError, UnicodeDecodeError):
            # Bytes without a readable query_id cannot be answered in-stream: the caller's bug
            # ends the stream INVALID_ARGUMENT (as server.common.request_guard does for QueryCards).
            self.outgoing.put_nowait(
                errors.InvalidArgument([errors.FieldViolation("", "a query could not be parsed")])
            )
        except Exception as error:  # handed to the writer, which fails the stream with it
            self.outgoing.put_nowait(error)

    def _receive(self, request: pb.QuerySessionRequest) -> None:
        """Fault gate and validation in QueryCards' order: outage, validation, delay, injected error."""
        self.received += 1
        self.outstanding += 1
        if self._tracer is not None:
            self._trace(request)
        faults = self._servicer.faults  # one snapshot per query
        if not faults.query_session or (self.batched and not faults.query_batches):
            # Switched off at run time: the bank restarts as a version without this RPC.
            # This stream goes away; the union's next one gets UNIMPLEMENTED.
            self._end(abort=True, reason=f"{self._bank} is going away")
            return
        if faults.outage:
            self._fail(request.query_id, grpc.StatusCode.UNAVAILABLE, f"{self._bank} is unavailable")
            return
        violations = _query_violations(request)
        if violations:
            message = errors.InvalidArgument(violations).message  # field names, never values
            self._fail(request.query_id, grpc.StatusCode.INVALID_ARGUMENT, message)
            return
        query = _Query(request.query_id, request.resident_id_number, request.name, faults)
        delay = faults.start_delay(self._rng)
        if delay:
            self._later(delay, lambda: self._delayed(query))
        else:
            self._delayed(query)

    def _trace(self, request: pb.QuerySessionRequest) -> None:
        assert self._tracer is not None
        span = tracing.start_child(
            self._tracer,
            self._span_name,
            request.trace_context,
            SpanKind.SERVER,
            {"rpc.system": "grpc", "cardlookup.bank": self._bank},
        )
        if (earlier := self._spans.pop(request.query_id, None)) is not None:
            tracing.end_failed(earlier, "the same query id was asked again")
        self._spans[request.query_id] = span

    def _delayed(self, query: _Query) -> None:
        if query.faults.fails(self._rng):
            self._fail(query.query_id, query.faults.error_code, f"{self._bank}: injected failure")
            return
        self._pending.append(query)
        self._lookup_wanted.set()

    # --- looking up ------------------------------------------------------------------------

    async def _look_up(self) -> None:
        """One store read per batch: whatever queued up while the previous read ran."""
        store = self._servicer.store
        try:
            while True:
                await self._lookup_wanted.wait()
                self._lookup_wanted.clear()
                batch, self._pending = self._pending, []
                people = [(query.resident_id_number, query.name) for query in batch]
                try:
                    if store.reads_locally and len(people) <= self._servicer.inline_read_limit:
                        found = store.find_cards_many(people)
                    else:
                        found = await asyncio.to_thread(store.find_cards_many, people)
                except Exception:
                    # What QueryCards would end with (INTERNAL), for these queries only.
                    log.exception("card lookup failed", extra={"bank": self._bank, "queries": len(batch)})
                    for query in batch:
                        self._fail(query.query_id, grpc.StatusCode.INTERNAL, "internal error")
                    continue
                for query, cards in zip(batch, found, strict=True):
                    self._looked_up(query, cards)
        except Exception as error:
            self.outgoing.put_nowait(error)

    def _looked_up(self, query: _Query, cards: Sequence[StoredCard]) -> None:
        delay_ms = query.faults.record_delay_ms * len(cards)
        if delay_ms:
            self._later(delay_ms / 1000, lambda: self._answer(query, cards))
        else:
            self._answer(query, cards)

    # --- answering -------------------------------------------------------------------------

    def _answer(self, query: _Query, cards: Sequence[StoredCard]) -> None:
        """The QueryCards answer in one message, bent by the same knobs."""
        faults = query.faults
        if _dies_now(faults, len(cards)):
            # As in QueryCards, the bank dies before the (die_after_records + 1)-th message of an
            # answer; here that message would be in this answer, so the whole stream goes.
            self._end(abort=faults.die_mode == "abort", reason=f"{self._bank}: connection lost")
            return
        records = [to_card_record(self._bank, card) for card in cards]
        if faults.lie != "none":
            for record, card in zip(records, cards, strict=True):
                lie_about(record, card, faults.lie)
        answer = pb.QueryAnswer(cards=records)
        if faults.truncate != "omit_summary":
            count = len(records) + 1 if faults.truncate == "wrong_count" else len(records)
            summary_bank = other_bank_code(self._bank) if faults.lie == "wrong_bank" else self._bank
            answer.summary.bank_code = summary_bank
            answer.summary.record_count = count
        self.answered += 1
        self.outgoing.put_nowait(pb.QuerySessionResponse(query_id=query.query_id, answer=answer))
        if (span := self._spans.pop(query.query_id, None)) is not None:
            span.set_attribute("cardlookup.records", len(records))
            span.end()
        if self._debug:
            log.debug(
                "answered query",
                extra={"query_id": query.query_id, "bank": self._bank, "records": len(cards)},
            )

    def _fail(self, query_id: str, code: grpc.StatusCode, message: str) -> None:
        self.failed += 1
        self.outgoing.put_nowait(_error(query_id, code, message))
        if (span := self._spans.pop(query_id, None)) is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            tracing.end_failed(span, code.name)
        if self._debug:
            log.debug("failed query", extra={"query_id": query_id, "bank": self._bank, "code": code.name})

    def _end(self, abort: bool, reason: str) -> None:
        if not self._ending:
            self._ending = True
            self.outgoing.put_nowait(_StreamEnd(abort, reason))

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` after `delay` seconds without holding up any other query."""

        def fire() -> None:
            self._timers.discard(handle)
            try:
                callback()
            except Exception as error:
                self.outgoing.put_nowait(error)

        handle = self._loop.call_later(delay, fire)
        self._timers.add(handle)


class BankQueryServicer(pb_grpc.BankQueryServiceServicer):
    """One bank's answer to the union. `faults` may be replaced at any time."""

    def __init__(
        self,
        bank_code: str,
        store: BankStore,
        faults: FaultSettings | None = None,
        max_outstanding: int = MAX_OUTSTANDING_QUERIES,
    ) -> None:
        if max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1")
        self.bank_code = bank_code
        self.store = store
        self._faults = faults or FaultSettings()
        self._fault_listeners: list[Callable[[FaultSettings], None]] = []
        self.max_outstanding = max_outstanding
        self.inline_read_limit = INLINE_READ_LIMIT
        # Fault decisions only; nothing security-relevant is drawn from it.
        self._rng = random.Random()  # noqa: S311
        self._sessions: set[_QuerySession] = set()
        # Spans per session query when the bank traces (server.common.tracing); None: off.
        self.tracer: Tracer | None = None

    @property
    def faults(self) -> FaultSettings:
        return self._faults

    @faults.setter
    def faults(self, settings: FaultSettings) -> None:
        self._faults = settings
        for listener in self._fault_listeners:
            listener(settings)

    def on_faults_changed(self, listener: Callable[[FaultSettings], None]) -> None:
        """Call `listener` with every new setting (the bank's health follows its outage)."""
        self._fault_listeners.append(listener)

    @property
    def open_sessions(self) -> int:
        """QuerySession streams in progress (tests check none outlives its client)."""
        return len(self._sessions)

    def session_received(self) -> list[int]:
        """Queries read so far on each open QuerySession stream (tests observe backpressure)."""
        return [session.received for session in self._sessions]

    def session_messages(self) -> list[int]:
        """Request messages read so far on each open session stream (tests observe batching)."""
        return [session.messages for session in self._sessions]

    async def _fault_gate(
        self, faults: FaultSettings, context: grpc.aio.ServicerContext[Any, Any], validate: Callable[[], None]
    ) -> None:
        """Outage, validation, latency and injected errors, in that order, for every RPC."""
        if faults.outage:
            raise errors.Unavailable(f"{self.bank_code} is unavailable")
        validate()
        delay = faults.start_delay(self._rng)
        if delay:
            await asyncio.sleep(delay)
        if faults.fails(self._rng):
            await context.abort(faults.error_code, f"{self.bank_code}: injected failure")

    @grpc_method
    async def QueryCards(
        self,
        request: pb.QueryCardsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.QueryCardsResponse]:
        faults = self.faults  # one snapshot per call, so a run-time change never mixes settings
        await self._fault_gate(faults, context, lambda: validate_request(request))

        cards = await asyncio.to_thread(self.store.find_cards, request.resident_id_number, request.name)
        sent = 0
        for card in cards:
            if _dies_now(faults, sent):
                await self._die(faults, context)
                return
            if faults.record_delay_ms:
                await asyncio.sleep(faults.record_delay_ms / 1000)
            record = to_card_record(self.bank_code, card)
            if faults.lie != "none":
                lie_about(record, card, faults.lie)
            yield pb.QueryCardsResponse(card=record)
            sent += 1
        if _dies_now(faults, sent):
            await self._die(faults, context)
            return
        if faults.truncate == "omit_summary":
            return
        count = sent + 1 if faults.truncate == "wrong_count" else sent
        summary_bank = other_bank_code(self.bank_code) if faults.lie == "wrong_bank" else self.bank_code
        # DEBUG: a line per query at INFO costs real throughput at hundreds of queries a second.
        log.debug(
            "answered query", extra={"query_id": request.query_id, "bank": self.bank_code, "records": sent}
        )
        yield pb.QueryCardsResponse(summary=pb.QuerySummary(bank_code=summary_bank, record_count=count))

    async def _die(self, faults: FaultSettings, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if faults.die_mode == "abort":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.bank_code}: connection lost")

    @grpc_method
    async def QuerySession(
        self,
        request_iterator: AsyncIterator[pb.QuerySessionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.QuerySessionResponse]:
        """Answer every query read, in whatever order the answers are ready, one per message.
        OK once the union half-closes and all is answered."""
        if not self.faults.query_session:
            await self._refuse_session(request_iterator, context, f"{self.bank_code} answers only QueryCards")
        async for answers in self._serve_session(request_iterator, context, batched=False):
            for answer in answers:  # never more than one here
                yield answer

    @grpc_method
    async def QueryBatchSession(
        self,
        request_iterator: AsyncIterator[pb.QueryBatchSessionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.QueryBatchSessionResponse]:
        """QuerySession with every answer that is ready sent in one message."""
        if not (self.faults.query_session and self.faults.query_batches):
            await self._refuse_session(request_iterator, context, f"{self.bank_code} has no batched session")
        async for answers in self._serve_session(request_iterator, context, batched=True):
            yield pb.QueryBatchSessionResponse(answers=answers)

    @staticmethod
    async def _refuse_session(
        request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any], message: str
    ) -> None:
        """UNIMPLEMENTED, once the caller's first message (or its half-close) has arrived.

        A caller writes its first query as soon as the stream is open. Ended before that write
        is made, the stream makes grpc.aio's client report INTERNAL ("Internal error from
        Core", grpc/grpc#36066) in place of this status, and the union, which falls back to
        QuerySession or QueryCards only on UNIMPLEMENTED, counted the bank as failing. Once the
        first message is here, that write is done, and the refusal is what the caller reads."""
        with contextlib.suppress(StopAsyncIteration):
            await anext(aiter(request_iterator))
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    async def _serve_session(
        self,
        request_iterator: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        batched: bool,
    ) -> AsyncIterator[list[pb.QuerySessionResponse]]:
        """The answers to write next (one, or on a batched stream all that are ready); this
        handler is the stream's only writer, and a batch counts as written once the caller asks
        for the next."""
        session = _QuerySession(self, request_iterator, self.max_outstanding, batched)
        self._sessions.add(session)
        outcome = "cancelled"
        limit = MAX_BATCH if batched else 1
        try:
            session.start()
            outgoing = session.outgoing
            held: _Outgoing | None = None  # an item taken while gathering a batch, handled next
            while not (session.reading_done and session.outstanding == 0):
                item = held if held is not None else await outgoing.get()
                held = None
                if isinstance(item, pb.QuerySessionResponse):
                    answers = [item]
                    while len(answers) < limit and not outgoing.empty():
                        more = outgoing.get_nowait()
                        if not isinstance(more, pb.QuerySessionResponse):
                            held = more
                            break
                        answers.append(more)
                    yield answers
                    session.written(len(answers))
                elif isinstance(item, _ReadDone):
                    session.reading_done = True
                elif isinstance(item, _StreamEnd):
                    outcome = "died" if item.abort else "ended early"
                    if item.abort:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, item.reason)
                    return
                else:
                    outcome = "failed"
                    raise item  # grpc_method: a DomainError's status, anything else INTERNAL (logged)
            outcome = "ok"
        finally:
            self._sessions.discard(session)
            await session.close()
            # Once per stream at INFO; per query only at DEBUG (thousands a second).
            log.info(
                "query session ended",
                extra={
                    "bank": self.bank_code,
                    "batched": batched,
                    "outcome": outcome,
                    "queries": session.received,
                    "messages": session.messages,
                    "answered": session.answered,
                    "failed": session.failed,
                    "seconds": round(time.monotonic() - session.started, 3),
                },
            )

    async def _act(
        self,
        kind: ActionKind,
        request: CardActionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ActionAnswer:
        await self._fault_gate(self.faults, context, lambda: validate_action_request(request))
        act = actions.close_card if kind == "close" else actions.report_not_mine
        try:
            answer = await asyncio.to_thread(
                act,
                self.store,
                request.request_id,
                request.resident_id_number,
                request.name,
                request.card_ref,
            )
        except RequestConflict:
            raise errors.InvalidArgument(
                [errors.FieldViolation("request_id", "already used for a different card or request")]
            ) from None
        except CardNotFound:
            raise errors.NotFound("no such card") from None
        log.info(
            "answered card action",
            extra={
                "request_id": request.request_id,
                "bank": self.bank_code,
                "kind": kind,
                "outcome": answer.outcome,
                "replayed": answer.replayed,
            },
        )
        return answer

    @grpc_method
    async def CloseCard(
        self,
        request: pb.CloseCardRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CloseCardResponse:
        """The bank's decision (server.bank.actions.decide_closure); a retry gets the first answer."""
        answer = await self._act("close", request, context)
        return pb.CloseCardResponse(
            ticket_id=answer.reference,
            outcome=_CLOSURE_OUTCOMES.get(answer.outcome, pb.CLOSURE_OUTCOME_UNSPECIFIED),
            reason=answer.reason,
        )

    @grpc_method
    async def ReportCardNotMine(
        self,
        request: pb.ReportCardNotMineRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ReportCardNotMineResponse:
        """Freeze the card and open a fraud case; a retry gets the first case number.

        status is CARD_STATUS_FROZEN when the card is frozen after the report. A card that was
        already closed stays closed (freezing it would bring it back into QueryCards answers):
        its case is opened all the same and status is CARD_STATUS_UNSPECIFIED, since CardStatus
        has no value for a closed card.
        """
        answer = await self._act("not_mine", request, context)
        status = pb.CARD_STATUS_FROZEN if answer.outcome == "frozen" else pb.CARD_STATUS_UNSPECIFIED
        return pb.ReportCardNotMineResponse(case_number=answer.reference, status=status)
