"""Domain errors: what went wrong, in the domain's words, with no gRPC in sight.

Domain code raises these; `server.common.grpc_errors` is the one place that turns
them into canonical status codes with google.rpc rich details. Adding a new
kind of failure means one class here and one line there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

# The google.rpc.ErrorInfo domain for every error this project raises.
ERROR_DOMAIN = "cardlookup.example.com"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named by its proto field path."""

    field: str
    description: str


class DomainError(Exception):
    """Base class; `message` is safe to show the caller (it never carries PII)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """The request itself is malformed (INVALID_ARGUMENT + BadRequest)."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations) or "invalid request")
        self.violations = list(violations)


class NotFound(DomainError):
    """Missing, expired, deleted, or someone else's resource (NOT_FOUND)."""


class Unauthenticated(DomainError):
    """Missing, forged or expired credential, or a wrong one-time code."""

    def __init__(
        self, message: str, reason: str = "UNAUTHENTICATED", metadata: Mapping[str, str] | None = None
    ):
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})


class PermissionDenied(DomainError):
    """A valid credential that may not do this (a viewer asking for a change)."""

    def __init__(self, message: str, reason: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})


class FailedPrecondition(DomainError):
    """The system is not in a state that allows this (region closed, identity mismatch)."""

    def __init__(self, message: str, reason: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})


class ResourceExhausted(DomainError):
    """Quota, cooldown or lockout; `retry_after` tells the caller when to come back."""

    def __init__(
        self,
        message: str,
        reason: str,
        retry_after: timedelta | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})


class AlreadyExists(DomainError):
    """What a create would make exists already (a bank code that is taken)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unavailable(DomainError):
    """A dependency (database, bank) is down for now; retrying later may work."""

    def __init__(self, message: str, retry_after: timedelta | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
