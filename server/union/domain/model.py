"""Domain objects of the union: plain data, no gRPC, no SQL."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum


class LookupState(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"


class BankOutcome(StrEnum):
    PENDING = "pending"
    ANSWERED = "answered"
    FAILED = "failed"
    NO_RESPONSE = "no_response"


class CardType(StrEnum):
    DEBIT = "debit"
    CREDIT = "credit"


class CardStatus(StrEnum):
    ACTIVE = "active"
    DORMANT = "dormant"
    FROZEN = "frozen"


@dataclass(frozen=True)
class Bank:
    code: str
    name: str
    english_name: str
    address: str
    enabled: bool
    position: int
    interbank_code: str = ""
    tls_name: str = ""  # empty: the default name for its code (server.common.shapes.bank_tls_name)


@dataclass(frozen=True)
class NewBank:
    """A bank joining the service, as an operator registers it (validated)."""

    code: str
    name: str
    english_name: str
    interbank_code: str
    address: str
    tls_name: str


@dataclass(frozen=True)
class Region:
    code: str
    name: str
    open: bool
    open_time: datetime | None
    pilot_batch: int | None = None  # 1 or 2 for the pilot regions
    pilot_open_date: date | None = None


@dataclass(frozen=True)
class BankProgress:
    bank_code: str
    bank_name: str
    outcome: BankOutcome
    attempt_count: int
    card_count: int
    debit_count: int
    credit_count: int
    failure_reason: str


class UnaskedReason(StrEnum):
    NOT_CHOSEN = "not_chosen"
    BANK_DISABLED = "bank_disabled"
    REQUERY_COOLDOWN = "requery_cooldown"


@dataclass(frozen=True)
class UnaskedBank:
    """A participating bank a lookup does not ask, and why."""

    bank_code: str
    bank_name: str
    reason: UnaskedReason
    next_query_time: datetime | None = None  # for REQUERY_COOLDOWN


@dataclass(frozen=True)
class Lookup:
    """A lookup and its banks' progress. The request_id it was made with is kept only as a keyed
    hash, so it is not part of the lookup: nothing a client typed is stored or echoed."""

    id: str
    state: LookupState
    create_time: datetime
    deadline_time: datetime
    report_id: str | None
    banks: list[BankProgress]
    # When the report expires; the lookup (its per-bank counts) is not served past it either.
    report_expire_time: datetime | None = None
    unasked: list[UnaskedBank] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"lookups/{self.id}"


def mask_number(first_four: str, last_four: str, number_length: int) -> str:
    """First 4 and last 4 digits with one star per hidden digit, in groups of four:
    '6222 **** **** 1234' (16 digits), '6217 **** **** *** 1234' (19 digits)."""
    stars = "*" * (number_length - 8)
    middle = [stars[i : i + 4] for i in range(0, len(stars), 4)]
    return " ".join([first_four, *middle, last_four])


class ActionKind(StrEnum):
    CLOSE = "close"
    FLAG = "flag"


class ActionState(StrEnum):
    PENDING = "pending"
    CLOSED = "closed"
    SCHEDULED = "scheduled"
    BRANCH_VISIT_REQUIRED = "branch_visit_required"
    REJECTED = "rejected"
    FROZEN = "frozen"
    FAILED = "failed"


@dataclass(frozen=True)
class CardAction:
    """One card's closure or "not mine" flag, as the person sees it."""

    id: str
    kind: ActionKind
    card_ref: str
    bank_code: str
    bank_name: str
    first_four: str
    last_four: str
    number_length: int
    state: ActionState
    ticket: str  # the bank's ticket id (closure) or fraud case number (flag)
    reason: str
    create_time: datetime
    update_time: datetime

    @property
    def masked_number(self) -> str:
        return mask_number(self.first_four, self.last_four, self.number_length)


@dataclass(frozen=True)
class CardClosure:
    id: str
    report_id: str
    create_time: datetime
    items: list[CardAction]

    @property
    def name(self) -> str:
        return f"closures/{self.id}"

    @property
    def final(self) -> bool:
        return all(item.state != ActionState.PENDING for item in self.items)


@dataclass(frozen=True)
class AuditEntry:
    """An audit event to write (the store gives it its id)."""

    time: datetime
    actor: str
    action: str
    outcome: str
    resource: str


@dataclass(frozen=True)
class AuditEvent(AuditEntry):
    """An audit event as stored."""

    id: int = 0


@dataclass(frozen=True)
class ActionClaim:
    """A card action leased to this replica for one attempt."""

    action_id: str
    kind: ActionKind
    closure_id: str | None
    person_hash: str
    bank_code: str
    bank_card_ref: str
    attempt: int
    sealed_identity: str | None
    deadline_time: datetime


@dataclass(frozen=True)
class ReportCardSource:
    """What the union keeps about a report card, enough to ask its bank to act on it."""

    lookup_id: str
    card_ref: str
    bank_code: str
    bank_name: str
    bank_card_ref: str
    first_four: str
    last_four: str
    number_length: int


@dataclass(frozen=True)
class MaskedCard:
    """A card as the union knows it: never more than first 4 + last 4 digits."""

    card_ref: str
    bank_code: str
    bank_name: str
    card_type: CardType
    first_four: str
    last_four: str
    number_length: int
    status: CardStatus
    open_time: datetime | None = None  # when the bank opened it, if the bank said

    flag: CardAction | None = None
    closure: CardAction | None = None

    @property
    def masked_number(self) -> str:
        return mask_number(self.first_four, self.last_four, self.number_length)


@dataclass(frozen=True)
class Report:
    id: str
    lookup_id: str
    generate_time: datetime
    expire_time: datetime
    banks: list[BankProgress]
    cards: list[MaskedCard] = field(default_factory=list)
    unasked: list[UnaskedBank] = field(default_factory=list)
    # When the person may ask each bank again as far as this report goes (bank code → time);
    # filled by the lookup service, which knows the re-query cooldown.
    next_query_times: dict[str, datetime] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"reports/{self.id}"


@dataclass(frozen=True)
class BankStats:
    bank_code: str
    answered: int
    failed: int
    mean_latency_ms: float


@dataclass(frozen=True)
class ServiceStats:
    people_verified: int
    lookups_created: int
    reports_generated: int
    banks: list[BankStats]


@dataclass(frozen=True)
class ReportPlan:
    """The report to write if a transaction turns out to finish its lookup."""

    report_id: str
    expire_time: datetime


@dataclass(frozen=True)
class PersonActivity:
    """What admitting a person's new lookup depends on, read in the transaction that creates it."""

    running: bool  # one of the person's lookups is running
    # Per bank: when the latest of the person's completed lookups that this bank answered completed
    # (the re-query cooldown runs per bank from there).
    answered_banks: dict[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    """What a new lookup asks, decided in its creating transaction: the banks, and the
    participating banks it does not ask (with why)."""

    banks: list[Bank]
    unasked: list[UnaskedBank]


@dataclass(frozen=True)
class ClaimRequest:
    """Lease these banks' tasks of a new lookup to `owner` as it is created."""

    owner: str
    bank_codes: frozenset[str]
    lease: timedelta


@dataclass(frozen=True)
class Claim:
    """A bank task leased to this replica for one attempt."""

    lookup_id: str
    bank_code: str
    attempt: int
    sealed_identity: str | None
    deadline_time: datetime


@dataclass(frozen=True)
class NewVerification:
    """A verification about to be stored: keyed hashes and sealed values only."""

    id: str
    person_hash: str
    region_code: str
    sealed_identity: str
    code_hash: str
    create_time: datetime
    expire_time: datetime


@dataclass(frozen=True)
class Verification:
    """A stored verification as the domain reads it back (never the code, only its keyed hash)."""

    id: str
    person_hash: str
    region_code: str
    sealed_identity: str | None  # erased once used, locked or expired
    code_hash: str
    failed_attempts: int
    completed: bool
    create_time: datetime
    expire_time: datetime


@dataclass(frozen=True)
class RegisteredIdentity:
    """A person in the identity registry, as keyed hashes: who may verify, and from where."""

    person_hash: str
    name_hash: str
    mobile_hash: str
    region_code: str
